"""VSRN's captioning branch: an S2VT-style GRU encoder over the image regions and a GRU decoder
with additive attention, trained with full teacher forcing (docs/models.md).

Attribute names follow the reference's state-dict keys (`encoder.vid2hid`, `encoder.rnn`,
`decoder.embedding`, `decoder.attention.linear1`, `decoder.attention.linear2`, `decoder.rnn`,
`decoder.out`) so released checkpoints load by key.
"""

import torch
import torch.nn.functional as F
from torch import nn

from models.rnn import run_gru


class RegionEncoder(nn.Module):
    """vid2hid (per region) -> dropout -> GRU over the regions in file order."""

    def __init__(self, dim_vid, dim_hidden, dropout_p=0.2):
        super().__init__()
        self.vid2hid = nn.Linear(dim_vid, dim_hidden)
        self.input_dropout = nn.Dropout(dropout_p)
        self.rnn = nn.GRU(dim_hidden, dim_hidden, num_layers=1, batch_first=True, dropout=0.0)
        nn.init.xavier_normal_(self.vid2hid.weight)  # bias keeps the PyTorch default

    def forward(self, regions):
        """regions (B, N, dim_vid) -> (outputs (B, N, H), final state (1, B, H))."""
        return run_gru(self.rnn, self.input_dropout(self.vid2hid(regions)))


class Attention(nn.Module):
    """e_r = w2^T tanh(W1 [E_r ; q] + b1), alpha = softmax_r(e), context = sum_r alpha_r E_r."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.linear1 = nn.Linear(2 * dim, dim)
        self.linear2 = nn.Linear(dim, 1, bias=False)

    def forward(self, query, enc):
        """Direct form. query (B, H), enc (B, N, H) -> context (B, H)."""
        pairs = torch.cat([enc, query.unsqueeze(1).expand_as(enc)], dim=2)  # encoder output first
        energy = self.linear2(torch.tanh(self.linear1(pairs)))  # (B, N, 1)
        return (F.softmax(energy, dim=1) * enc).sum(dim=1)

    def precompute(self, enc):
        """The query-independent part W1[:, :H] E_r + b1 (B, N, H); W1 split by columns is exact."""
        return F.linear(enc, self.linear1.weight[:, : self.dim], self.linear1.bias)

    def step(self, query, enc, pre):
        """Same as forward(query, enc), given pre = precompute(enc)."""
        q_part = F.linear(query, self.linear1.weight[:, self.dim :])  # (B, H)
        energy = self.linear2(torch.tanh(pre + q_part.unsqueeze(1)))  # (B, N, 1)
        alpha = F.softmax(energy, dim=1)
        return torch.bmm(alpha.transpose(1, 2), enc).squeeze(1)


class AttnDecoder(nn.Module):
    """Teacher-forced GRU decoder: input dropout([Emb(word) ; context]), state starts at h_enc."""

    def __init__(self, vocab_size, dim_hidden, dim_word, dropout_p=0.2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim_word)  # default N(0, 1)
        self.attention = Attention(dim_hidden)
        self.input_dropout = nn.Dropout(dropout_p)
        self.rnn = nn.GRU(dim_word + dim_hidden, dim_hidden, num_layers=1, batch_first=True, dropout=0.0)
        self.out = nn.Linear(dim_hidden, vocab_size)
        nn.init.xavier_normal_(self.out.weight)  # bias keeps the PyTorch default

    def forward(self, enc, h_enc, words):
        """enc (B, N, H), h_enc (1, B, H), words (B, T) input ids -> logits (B, T, V).

        Step t reads words[:, t] and attends with the previous state (h_enc at t = 0). The
        output layer runs once over all steps (the same numbers as applying it per step).
        """
        pre = self.attention.precompute(enc)
        emb = self.embedding(words)  # (B, T, dim_word)
        hidden, states = h_enc, []
        for t in range(words.shape[1]):
            context = self.attention.step(hidden[0], enc, pre)
            step_in = self.input_dropout(torch.cat([emb[:, t], context], dim=1))  # word first
            out, hidden = self.rnn(step_in.unsqueeze(1), hidden)
            states.append(out)
        return self.out(torch.cat(states, dim=1))


class CaptionModel(nn.Module):
    """Encoder + decoder; `forward` returns teacher-forced logits for the first `steps` steps."""

    def __init__(self, vocab_size, dim_vid, dim_hidden=512, dim_word=300, dropout_p=0.2):
        super().__init__()
        self.encoder = RegionEncoder(dim_vid, dim_hidden, dropout_p)
        self.decoder = AttnDecoder(vocab_size, dim_hidden, dim_word, dropout_p)

    def forward(self, regions, labels, steps):
        """regions (B, N, dim_vid), labels (B, >= steps) -> logits (B, steps, V)."""
        enc, h_enc = self.encoder(regions)
        return self.decoder(enc, h_enc, labels[:, :steps])


def masked_caption_nll(logits, labels, masks):
    """Sum over (b, t) of masks[b, t+1] * -log softmax(logits[b, t])[labels[b, t+1]], / B.

    logits (B, T, V) are the predictions of steps 0 .. T-1 (step t predicts labels[:, t+1]).
    Reduced-precision logits (autocast) are promoted to float32: the softmax and sums run in float32.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    steps = logits.shape[1]
    targets = labels[:, 1 : steps + 1]
    weights = masks[:, 1 : steps + 1].to(logits.dtype)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[2]), targets.reshape(-1), reduction="none")
    return (nll.view_as(weights) * weights).sum() / logits.shape[0]
