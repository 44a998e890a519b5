"""BFAN (Liu et al., Bidirectional Focal Attention Network) over bottom-up region features.

docs/models.md describes it. Encoders as SCAN (models/scan.py) with
the text GRU always bidirectional (directions averaged). Score: focal attention in both directions,
S = mean_j cos(w_j, a_j^t2i) + mean_i cos(v_i, a_i^i2t) (models/attention.py).
"""

from dataclasses import dataclass

import torch

from models import attention as xattn
from models.scan import PRECOMP_ENC_TYPES, RegionWordModel


@dataclass
class BFANConfig:
    vocab_size: int
    img_dim: int = 2048
    embed_size: int = 1024
    word_dim: int = 300
    precomp_enc_type: str = "basic"
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    focal_type: str = "equal"
    lambda_softmax: float = 20.0
    chunk: int = 32  # captions scored at a time in score_all (memory bound; results unchanged)

    def __post_init__(self):
        if self.focal_type not in xattn.FOCAL_TYPES:
            raise ValueError(f"unknown focal_type {self.focal_type!r}; choose from {xattn.FOCAL_TYPES}")
        if self.precomp_enc_type not in PRECOMP_ENC_TYPES:
            raise ValueError(
                f"unknown precomp_enc_type {self.precomp_enc_type!r}; choose from {PRECOMP_ENC_TYPES}"
            )


class BFAN(RegionWordModel):
    name = "bfan"
    config_class = BFANConfig

    def __init__(self, config):
        super().__init__(config, bi_gru=True)
        # Rows (pair, real query) whose focal mask was all zero and kept the pre-assigned attention
        # (the guard of docs/models.md); a 0-dim tensor so counting never forces a device sync.
        self.focal_fallbacks = torch.zeros((), dtype=torch.long)

    def _scores(self, img, cap, paired, sparse_grad=False):
        scores, fallbacks = xattn.bfan_scores(
            img,
            cap[0],
            cap[1],
            focal_type=self.config.focal_type,
            lambda_softmax=self.config.lambda_softmax,
            paired=paired,
            chunk=self.config.chunk,
            return_fallbacks=True,
            sparse_grad=sparse_grad,
        )
        self.focal_fallbacks = self.focal_fallbacks.to(fallbacks.device) + fallbacks
        return scores

    def score_all(self, img, cap):
        return self._scores(img, cap, paired=False)

    def score_paired(self, img, cap):
        return self._scores(img, cap, paired=True)

    def training_scores(self, img, cap, few_gradients):
        return self._scores(img, cap, paired=False, sparse_grad=few_gradients)
