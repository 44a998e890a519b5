"""VSE++ (Faghri et al.) over bottom-up region features.

VSE++'s precomp encoder takes one global vector per image; SCAN's features are 36 regions, so we
pool them by their mean first (docs/models.md). Image: mean of regions ->
Linear -> l2norm. Text: Embedding -> 1-layer GRU -> output at the last real token (<end>) -> l2norm.
"""

import math
from dataclasses import dataclass

from torch import nn

from models.base import MatchingModel, l2norm
from models.rnn import run_gru


@dataclass
class VSEPPConfig:
    vocab_size: int
    img_dim: int = 2048
    embed_size: int = 1024
    word_dim: int = 300


class VSEPP(MatchingModel):
    name = "vsepp"
    config_class = VSEPPConfig
    single_vector = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.img_fc = nn.Linear(config.img_dim, config.embed_size)
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        self.rnn = nn.GRU(config.word_dim, config.embed_size, batch_first=True)
        self._init_weights()

    def _init_weights(self):
        # Xavier-uniform fc with zero bias and U(-0.1, 0.1) word vectors, as in the reference.
        r = math.sqrt(6.0) / math.sqrt(self.img_fc.in_features + self.img_fc.out_features)
        nn.init.uniform_(self.img_fc.weight, -r, r)
        nn.init.zeros_(self.img_fc.bias)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def encode_images(self, images):
        pooled = images.mean(dim=1)  # (B, D)
        return l2norm(self.img_fc(pooled))  # (B, embed)

    def encode_captions(self, ids, lengths):
        words = self.embed(ids)  # (B, L, word_dim)
        _, h = run_gru(self.rnn, words, lengths)  # h (1, B, embed): state after <end>
        return l2norm(h[0])  # (B, embed)
