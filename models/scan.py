"""SCAN (Lee et al., Stacked Cross Attention) over bottom-up region features.

docs/models.md describes it; the cross attention is in models/attention.py.

Image: per-region Linear (Xavier-uniform, zero bias; or whole-matrix weight norm) -> l2norm per
region -> (B, k, d). Text: Embedding U(-0.1, 0.1) -> GRU (bi-GRU directions averaged) -> per-token
l2norm -> CaptionFeatures(words (B, L, d) zero beyond each length, lengths (B,)).
`RegionWordModel` holds these encoders and the caption representation helpers; BFAN reuses it.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from accel import linear as fast_linear
from models import attention as xattn
from models.base import MatchingModel
from models.rnn import run_gru

PRECOMP_ENC_TYPES = ("basic", "weight_norm")


class CaptionFeatures(NamedTuple):
    """Caption representation: words (B, L, d), zero beyond each length; lengths (B,) int64 (CPU)."""

    words: torch.Tensor
    lengths: torch.Tensor


class RegionWordModel(MatchingModel):
    """Region-feature image encoder + GRU word encoder shared by SCAN and BFAN (no scoring)."""

    single_vector = False

    def __init__(self, config, bi_gru):
        super().__init__()
        self.config = config
        if config.precomp_enc_type not in PRECOMP_ENC_TYPES:
            raise ValueError(
                f"unknown precomp_enc_type {config.precomp_enc_type!r}; choose from {PRECOMP_ENC_TYPES}"
            )
        self.img_fc = nn.Linear(config.img_dim, config.embed_size)
        if config.precomp_enc_type == "basic":
            # Xavier-uniform weights, zero bias (weight_norm keeps the framework default init).
            r = math.sqrt(6.0) / math.sqrt(config.img_dim + config.embed_size)
            nn.init.uniform_(self.img_fc.weight, -r, r)
            nn.init.zeros_(self.img_fc.bias)
        else:
            # W = g V / ||V||_F with one scalar g over the whole matrix (dim=None).
            self.img_fc = weight_norm(self.img_fc, dim=None)
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.bi_gru = bool(bi_gru)
        self.rnn = nn.GRU(config.word_dim, config.embed_size, batch_first=True, bidirectional=self.bi_gru)

    # The reference layout (SCAN, BFAN and AOQ's BFAN): [image encoder state, text encoder state],
    # with the image encoder's linear map named `fc`.
    def reference_state(self):
        own = self.state_dict()
        image = {"fc." + k[len("img_fc.") :]: v.clone() for k, v in own.items() if k.startswith("img_fc.")}
        text = {k: v.clone() for k, v in own.items() if not k.startswith("img_fc.")}
        return [image, text]

    def load_reference_state(self, states):
        """Load [image encoder state, text encoder state]; ValueError names any key that differs."""
        if len(states) != 2:
            raise ValueError(f"expected 2 state dicts [image encoder, text encoder], got {len(states)}")
        image, text = states
        ours = {
            "img_fc." + k[len("fc.") :] if k.startswith("fc.") else f"image encoder: {k}": v
            for k, v in image.items()
        }
        ours.update(text)
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(ours)), sorted(set(ours) - set(own))
        if missing or unexpected:
            raise ValueError(f"missing keys {missing}, unexpected keys {unexpected}")
        for key, value in ours.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        self.load_state_dict(ours)

    @classmethod
    def config_from_reference(cls, opt, states):
        """Config of a released checkpoint: sizes from the weights, options from its argparse opt."""
        image, text = states
        sizes = dict(
            vocab_size=text["embed.weight"].shape[0],
            word_dim=text["embed.weight"].shape[1],
            embed_size=image["fc.weight"].shape[0],
            img_dim=image["fc.weight"].shape[1],
        )
        if "bi_gru" in cls.config_class.__dataclass_fields__:
            sizes["bi_gru"] = "rnn.weight_ih_l0_reverse" in text
        options = {
            k: v for k, v in opt.items() if k in cls.config_class.__dataclass_fields__ and k not in sizes
        }
        return cls.config_class(**sizes, **options)

    def encode_images(self, images):
        """images (B, k, img_dim) -> (B, k, embed_size), each region l2-normalised."""
        if fast_linear.applies(images):  # its backward skips images without a gradient
            regions = fast_linear.linear(images, self.img_fc.weight, self.img_fc.bias)
        else:
            regions = self.img_fc(images)
        return regions if self.config.no_imgnorm else xattn.l2norm(regions, dim=-1)

    def encode_captions(self, ids, lengths):
        """ids (B, L) padded, lengths (B,) -> CaptionFeatures((B, max length, d), lengths)."""
        lengths_cpu = torch.as_tensor(lengths, dtype=torch.long).cpu()
        # bi-GRU: the average of the two directions; then the per-word l2norm. Both run on the
        # real words only, before padding (padded positions are zeros).
        norm = None if self.config.no_txtnorm else (lambda rows: xattn.l2norm(rows, dim=-1))
        out, _ = run_gru(
            self.rnn,
            self.embed(ids),
            lengths_cpu,
            directions="mean" if self.bi_gru else "concat",
            token_map=norm,
        )
        # lengths stay on the CPU: the kernels read them without a device sync
        return CaptionFeatures(out, lengths_cpu)

    @staticmethod
    def concat_representations(reps):
        """Join caption representations of consecutive batches, padding words to the longest L;
        plain tensors (image representations) are concatenated along dim 0."""
        reps = list(reps)
        if not isinstance(reps[0], tuple):
            return torch.cat(reps)
        max_len = max(words.shape[1] for words, _ in reps)
        words = torch.cat([nn.functional.pad(w, (0, 0, 0, max_len - w.shape[1])) for w, _ in reps])
        return CaptionFeatures(words, torch.cat([torch.as_tensor(n) for _, n in reps]))

    @staticmethod
    def slice_representation(rep, start, stop):
        """Rows [start, stop); a caption slice is trimmed to its own longest caption."""
        if not isinstance(rep, tuple):
            return rep[start:stop]
        words, lengths = rep[0][start:stop], rep[1][start:stop]
        if len(lengths):
            words = words[:, : int(lengths.max())]
        return CaptionFeatures(words, lengths)


@dataclass
class SCANConfig:
    vocab_size: int
    img_dim: int = 2048
    embed_size: int = 1024
    word_dim: int = 300
    bi_gru: bool = True
    precomp_enc_type: str = "basic"
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    cross_attn: str = "t2i"
    raw_feature_norm: str = "clipped_l2norm"
    agg_func: str = "LogSumExp"
    lambda_lse: float = 6.0
    lambda_softmax: float = 9.0
    chunk: int = 32  # captions scored at a time in score_all (memory bound; results unchanged)

    def __post_init__(self):
        for value, allowed, what in (
            (self.cross_attn, xattn.DIRECTIONS, "cross_attn"),
            (self.raw_feature_norm, xattn.RAW_FEATURE_NORMS, "raw_feature_norm"),
            (self.agg_func, xattn.AGG_FUNCS, "agg_func"),
            (self.precomp_enc_type, PRECOMP_ENC_TYPES, "precomp_enc_type"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose from {allowed}")


class SCAN(RegionWordModel):
    name = "scan"
    config_class = SCANConfig

    def __init__(self, config):
        super().__init__(config, bi_gru=config.bi_gru)

    def _scores(self, img, cap, paired, sparse_grad=False):
        c = self.config
        return xattn.scan_scores(
            img,
            cap[0],
            cap[1],
            direction=c.cross_attn,
            raw_feature_norm=c.raw_feature_norm,
            agg_func=c.agg_func,
            lambda_softmax=c.lambda_softmax,
            lambda_lse=c.lambda_lse,
            paired=paired,
            chunk=c.chunk,
            sparse_grad=sparse_grad,
        )

    def score_all(self, img, cap):
        return self._scores(img, cap, paired=False)

    def score_paired(self, img, cap):
        return self._scores(img, cap, paired=True)

    def training_scores(self, img, cap, few_gradients):
        return self._scores(img, cap, paired=False, sparse_grad=few_gradients)
