"""VSRN (Li et al., ICCV 2019): region features -> fc -> 4 Rs_GCN reasoning layers -> GRU over the
regions -> image vector; words -> GRU -> caption vector; plus a captioning branch on the GCN
output whose loss is added to the retrieval loss (docs/models.md).

Submodules and parameter names match the reference's three state dicts (`img_enc`, `txt_enc`,
`caption_model`; docs/data.md). The reference's quirks are config options whose defaults
reproduce it (docs/reference_behaviours.md): Q-L2AX `l2norm_over_regions`, Q-F30K `f30k_layout`,
Q-BNINIT `bn_weight_init`, Q-MASK `caption_mask_extra_pad`, Q-DUP `caption_double_step` (two Adam
steps per iteration for the "caption" parameter group, `adam_steps`), Q-BN3 `offline_bn_updates`.
"""

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.base import MatchingModel, l2norm
from models.caption_branch import CaptionModel, masked_caption_nll
from models.rnn import run_gru

START_ID, END_ID = 1, 2


@dataclass
class VSRNConfig:
    vocab_size: int
    img_dim: int = 2048
    embed_size: int = 2048
    word_dim: int = 300
    dim_hidden: int = 512  # captioning GRUs
    dim_word: int = 300  # captioning decoder word embedding
    max_len: int = 60  # captioning labels/masks have max_len + 1 columns
    gcn_layers: int = 4
    f30k_layout: bool = False  # Q-F30K: no l2norm after fc; BatchNorm1d on the image GRU state
    l2norm_over_regions: bool = True  # Q-L2AX; False = per-region l2norm
    bn_weight_init: str = "uniform"  # Q-BNINIT (F30K embedding BN only): "uniform" U(0,1) | "ones"
    caption_mask_extra_pad: bool = True  # Q-MASK: keep the one <pad> target after <end>
    caption_double_step: bool = True  # Q-DUP: see adam_steps
    offline_bn_updates: bool = True  # Q-BN3: AOQ offline passes update BN running statistics
    caption_loss_weight: float = 1.0
    captioning: bool = True  # False: retrieval only, no caption_model

    def __post_init__(self):
        if self.bn_weight_init not in ("uniform", "ones"):
            raise ValueError(f"bn_weight_init must be 'uniform' or 'ones', not {self.bn_weight_init!r}")
        if self.max_len < 2:
            raise ValueError("max_len must be at least 2")


def caption_targets(token_ids, max_len, extra_pad=True):
    """Captioning labels and mask of one caption (docs/models.md).

    token_ids: word ids without <start>/<end>. seq = [<start>] + words + [<end>]; a sequence longer
    than max_len is cut to max_len entries whose last one becomes <end>. L = len(seq).
    Returns labels int64 (max_len + 1,) = seq then zeros, and mask float32 (max_len + 1,) with ones
    at 0 .. L (one <pad> target after <end>, the reference's rule) or at 0 .. L-1 (extra_pad=False).
    """
    seq = [START_ID] + [int(t) for t in token_ids] + [END_ID]
    if len(seq) > max_len:
        seq = seq[:max_len]
        seq[-1] = END_ID
    labels = np.zeros(max_len + 1, dtype=np.int64)
    labels[: len(seq)] = seq
    mask = np.zeros(max_len + 1, dtype=np.float32)
    mask[: len(seq) + (1 if extra_pad else 0)] = 1.0
    return labels, mask


def region_l2norm(x, over_regions=True):
    """x (B, N, D): unit norm of each (b, :, d) N-vector (the reference's axis-1 l2norm, Q-L2AX),
    or of each region vector (b, n, :) when over_regions is False."""
    return l2norm(x, dim=1 if over_regions else 2)


class RsGCN(nn.Module):
    """Region relation reasoning layer (docs/models.md), on features laid out (B, N, C).

    A = theta(V)^T phi(V) / N (no softmax), Y = g(V) A^T, out = BN(W(Y)) + V. The 1x1 convolutions
    keep Conv1d parameters (reference keys g.*, theta.*, phi.*, W.0.*, W.1.*) but run as matrix
    products on the (B, N, C) layout: no cuDNN TF32 convolutions on GPUs (Q-TF32).

    Each pair of maps is applied as one C x C matrix (associativity; the same numbers up to float
    rounding). That halves the products over all B x N regions, forward and backward, for two
    weight-by-weight products per pass (a net 17% of the layer's time at B = 128):
      <theta_i, phi_k> = x_i^T M x_k + x_i . p + x_k . q + s,  M = W_th^T W_ph, p = W_th^T b_ph,
                                                                q = W_ph^T b_th, s = b_th . b_ph
      W(Y)_i = W_W (sum_k A_ik (W_g x_k + b_g)) + b_W = (W_W W_g)(A X)_i + (sum_k A_ik) W_W b_g + b_W
    """

    def __init__(self, channels):
        super().__init__()
        self.g = nn.Conv1d(channels, channels, kernel_size=1)
        self.theta = nn.Conv1d(channels, channels, kernel_size=1)
        self.phi = nn.Conv1d(channels, channels, kernel_size=1)
        self.W = nn.Sequential(nn.Conv1d(channels, channels, kernel_size=1), nn.BatchNorm1d(channels))
        nn.init.zeros_(self.W[1].weight)  # the layer is the identity at initialisation
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x):
        """x (B, N, C) -> (B, N, C)."""
        n_regions = x.shape[1]
        w_theta, w_phi = self.theta.weight.squeeze(-1), self.phi.weight.squeeze(-1)  # (C', C)
        w_g, w_w = self.g.weight.squeeze(-1), self.W[0].weight.squeeze(-1)  # (C', C), (C, C')
        b_theta, b_phi = self.theta.bias, self.phi.bias
        # <theta_i, phi_k> without forming theta or phi: (x_i^T M + q^T) x_k + x_i . p + s
        left = F.linear(x, w_phi.t() @ w_theta, w_phi.t() @ b_theta)  # (B, N, C)
        scores = torch.baddbmm(
            (x @ (w_theta.t() @ b_phi)).unsqueeze(2) + b_theta @ b_phi, left, x.transpose(1, 2)
        )  # (B, N, N)
        affinity = scores / n_regions  # A[i, k]
        mixed = torch.bmm(affinity, x)  # (A X)_i
        w_y = torch.addcmul(
            F.linear(mixed, w_w @ w_g, self.W[0].bias), affinity.sum(dim=2, keepdim=True), w_w @ self.g.bias
        )  # W(Y): (B, N, C)
        bn = self.W[1](w_y.reshape(-1, w_y.shape[2])).view_as(w_y)  # stats over batch x regions
        return bn + x


class ImageEncoder(nn.Module):
    """fc -> (COCO layout) l2norm -> Rs_GCN x k -> l2norm -> GRU -> (F30K: BN) -> l2norm."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.img_dim, cfg.embed_size)
        for k in range(1, cfg.gcn_layers + 1):
            setattr(self, f"Rs_GCN_{k}", RsGCN(cfg.embed_size))
        self.img_rnn = nn.GRU(cfg.embed_size, cfg.embed_size, num_layers=1, batch_first=True, dropout=0.0)
        if cfg.f30k_layout:
            self.bn = nn.BatchNorm1d(cfg.embed_size)
            if cfg.bn_weight_init == "uniform":  # PyTorch < 1.2 default (Q-BNINIT)
                nn.init.uniform_(self.bn.weight, 0.0, 1.0)
        r = math.sqrt(6.0) / math.sqrt(self.fc.in_features + self.fc.out_features)
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images):
        """images (B, N, img_dim) -> (v (B, embed) unit norm, G (B, N, embed))."""
        over = self.cfg.l2norm_over_regions
        x = self.fc(images)
        if not self.cfg.f30k_layout:
            x = region_l2norm(x, over)
        for k in range(1, self.cfg.gcn_layers + 1):
            x = getattr(self, f"Rs_GCN_{k}")(x)
        regions = region_l2norm(x, over)
        _, h = run_gru(self.img_rnn, regions)
        h = h[0]  # state after the last region
        if self.cfg.f30k_layout:
            h = self.bn(h)
        return l2norm(h, dim=1), regions


class TextEncoder(nn.Module):
    """Embedding -> GRU; the caption vector is the output at position L-1, l2-normalised."""

    def __init__(self, cfg):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim)
        self.rnn = nn.GRU(cfg.word_dim, cfg.embed_size, num_layers=1, batch_first=True, dropout=0.0)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, ids, lengths):
        _, h = run_gru(self.rnn, self.embed(ids), lengths)  # h (1, B, embed): state after <end>
        return l2norm(h[0], dim=1)


class VSRN(MatchingModel):
    name = "vsrn"
    config_class = VSRNConfig
    single_vector = True
    needs_caption_targets = True

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.img_enc = ImageEncoder(config)
        self.txt_enc = TextEncoder(config)
        if config.captioning:
            self.caption_model = CaptionModel(
                config.vocab_size, config.embed_size, config.dim_hidden, config.dim_word
            )

    # ---- encoders -------------------------------------------------------------------------------
    def encode_image_regions(self, images):
        """images (B, 36, img_dim) -> (v (B, embed), G (B, 36, embed)); G feeds the caption branch."""
        return self.img_enc(images)

    def encode_images(self, images):
        return self.img_enc(images)[0]

    def encode_captions(self, ids, lengths):
        return self.txt_enc(ids, lengths)

    # ---- captioning -----------------------------------------------------------------------------
    def caption_targets_of(self, token_ids):
        """Captioning (labels, mask) of one caption's word ids, for the batch builder."""
        return caption_targets(token_ids, self.config.max_len)

    def caption_weights(self, labels, masks):
        """The loss weights: masks, with <pad> targets dropped unless caption_mask_extra_pad (Q-MASK)."""
        if self.config.caption_mask_extra_pad:
            return masks
        return masks * (labels != 0).to(masks.dtype)

    def caption_steps(self, labels, masks):
        """Decoder steps the batch needs: 1 + the last t <= max_len - 2 whose target labels[:, t + 1]
        has a nonzero weight (at least 1)."""
        masks = self.caption_weights(labels, masks)
        used = (masks[:, 1 : self.config.max_len] > 0).any(dim=0).nonzero()
        return int(used.max()) + 1 if len(used) else 1

    def caption_loss(self, regions, labels, masks, truncate=True):
        """L_cap (docs/models.md): teacher forcing over t = 0 .. max_len - 2, masked NLL of
        labels[:, t + 1] summed over tokens and averaged over the batch (not weighted).

        With truncate, only the steps up to the last masked target run (the later ones have zero
        weight, so the loss is the same). Without caption_mask_extra_pad, <pad> targets get weight 0.
        """
        width = self.config.max_len + 1
        if labels.shape[1] != width or masks.shape[1] != width:
            raise ValueError(
                f"caption labels/masks must have max_len + 1 = {width} columns, "
                f"got {tuple(labels.shape)} / {tuple(masks.shape)}"
            )
        steps = self.caption_steps(labels, masks) if truncate else self.config.max_len - 1
        logits = self.caption_model(regions, labels, steps)
        return masked_caption_nll(logits, labels, self.caption_weights(labels, masks))

    def anchor_forward(self, batch, device):
        """(v, u, caption_loss_weight * L_cap or None when captioning is off)."""
        v, regions = self.img_enc(batch["images"].to(device))
        u = self.txt_enc(batch["ids"].to(device), batch["lengths"])
        if not self.config.captioning:
            return v, u, None
        loss = self.caption_loss(regions, batch["cap_labels"].to(device), batch["cap_masks"].to(device))
        return v, u, self.config.caption_loss_weight * loss

    # ---- training helpers -----------------------------------------------------------------------
    def parameter_groups(self):
        """'retrieval' (text then image encoder, the reference's order) and 'caption'."""
        retrieval = list(self.txt_enc.parameters()) + list(self.img_enc.parameters())
        caption = list(self.caption_model.parameters()) if self.config.captioning else []
        return {"retrieval": retrieval, "caption": caption}

    def adam_steps(self):
        """Q-DUP: the reference lists the captioning parameters twice, so they get two Adam
        steps per iteration (docs/reference_behaviours.md)."""
        return {"caption": 2} if self.config.caption_double_step else {}

    def offline_pass(self):
        """Q-BN3: by default the offline passes update BN running statistics like the anchor pass.
        With offline_bn_updates=False, BN still normalises with batch statistics but its running
        statistics (and num_batches_tracked) are left unchanged."""
        if self.config.offline_bn_updates:
            return contextlib.nullcontext()
        return _frozen_bn_statistics(self)

    # ---- reference checkpoints ------------------------------------------------------------------
    def _reference_parts(self):
        parts = [("img_enc", self.img_enc), ("txt_enc", self.txt_enc)]
        if self.config.captioning:
            parts.append(("caption_model", self.caption_model))
        return parts

    def reference_state(self):
        """[image-encoder state, text-encoder state(, caption-model state)], as the reference saves."""
        return [
            {k: v.detach().clone() for k, v in module.state_dict().items()}
            for _, module in self._reference_parts()
        ]

    @classmethod
    def config_from_reference(cls, opt, states):
        """VSRNConfig of a released checkpoint: sizes from the weights, the rest from its options."""
        image, text = states[0], states[1]
        config = dict(
            vocab_size=text["embed.weight"].shape[0],
            word_dim=text["embed.weight"].shape[1],
            embed_size=image["fc.weight"].shape[0],
            img_dim=image["fc.weight"].shape[1],
            gcn_layers=sum(1 for k in image if k.startswith("Rs_GCN_") and k.endswith(".g.weight")),
            f30k_layout="bn.weight" in image,
            captioning=len(states) > 2,
            max_len=int(opt.get("max_len", 60)),
        )
        if len(states) > 2:
            caption = states[2]
            config.update(
                dim_hidden=caption["encoder.vid2hid.weight"].shape[0],
                dim_word=caption["decoder.embedding.weight"].shape[1],
            )
        return cls.config_class(**config)

    def load_reference_state(self, states):
        """Load the reference's list of state dicts. Two entries (a VSRN checkpoint) leave the
        caption branch as it is; BN num_batches_tracked may be absent; any other missing or
        unexpected key, or a shape mismatch, raises ValueError naming it."""
        parts = self._reference_parts()
        if not 2 <= len(states) <= len(parts):
            raise ValueError(
                f"expected {len(parts)} (or 2) state dicts "
                f"[{', '.join(n for n, _ in parts)}], got {len(states)}"
            )
        for (part, module), state in zip(parts, states):
            own = module.state_dict()
            missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
            unexpected = [k for k in state if k not in own]
            if missing or unexpected:
                raise ValueError(f"{part}: missing keys {missing}, unexpected keys {unexpected}")
            for key, value in state.items():
                if tuple(value.shape) != tuple(own[key].shape):
                    raise ValueError(
                        f"{part}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                    )
            module.load_state_dict(state, strict=False)


@contextlib.contextmanager
def _frozen_bn_statistics(model):
    """Momentum 0 on every BatchNorm (running stats stay as they are), restored on exit."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in bns
    ]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
