"""Retrieval losses: the online hardest-negative triplet (VSE++) and the AOQ family.

Every loss takes the B x B score matrix of a batch (row i = image of item i, column j = caption of
item j, positives on the diagonal) plus, for the AOQ variants, the paired scores of the offline
pairs. Models that cannot produce single vectors (SCAN, BFAN) fit because only scores cross this
boundary. Reductions are sums over the batch, as in the reference (docs/method.md).
"""

import dataclasses
from dataclasses import dataclass

import torch

from models.variants import VARIANTS


@dataclass(frozen=True)
class LossConfig:
    variant: str = "baseline"
    margin_online: float = 0.2  # m_on
    margin_offline: float = 0.0  # m_off
    alpha: float = 0.3
    beta: float = 1.5
    detach_weights: bool = False  # the reference lets gradients flow through the weights
    max_violation: bool = True  # hardest in-batch negative (VSE++); False sums all (VSE0)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown loss variant {self.variant!r}; choose from {sorted(VARIANTS)}")
        if VARIANTS[self.variant].adaptive and not self.max_violation:
            # The reference's non-max-violation adaptive path broadcasts the weights along the
            # wrong axis (docs/reference_behaviours.md); it is meaningless, so refuse it.
            raise ValueError("adaptive weights need max_violation=True")

    @property
    def needs_offline(self):
        terms = VARIANTS[self.variant]
        return terms.offline_triplet or terms.quintuplet or terms.adaptive

    def summed_over_negatives(self):
        """This loss with the online hinge summed over every in-batch negative (VSE0), as warm-up
        epochs train. The adaptive weights need the hardest negative, so they are left out: the
        variant with the same other terms (AdapOffQuin warms up as OffQuin)."""
        terms = dataclasses.replace(VARIANTS[self.variant], adaptive=False)
        same = [name for name, t in VARIANTS.items() if dataclasses.replace(t, label=terms.label) == terms]
        if not same:
            raise ValueError(
                f"variant {self.variant!r} has no twin without adaptive weights for its warm-up epochs"
            )
        variant = same[0]
        return dataclasses.replace(self, variant=variant, max_violation=False)


@dataclass
class OfflineScores:
    """Paired scores of the offline pairs, each (B,): s(I1,T3), s(I3,T1), s(I3,T3), s(I4,T4)."""

    off_t: torch.Tensor  # anchor image vs offline hard-negative caption T3
    off_i: torch.Tensor  # offline hard-negative image I3 vs anchor caption
    quin_a: torch.Tensor  # I3 vs T3
    quin_b: torch.Tensor  # I4 (positive image of T3) vs T4 (a positive caption of I3)


def _at_least_fp32(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def hinge(margin, negative, positive):
    """[margin + negative - positive]_+ elementwise."""
    return (margin + negative - positive).clamp(min=0)


# The reference pushes the diagonal down by this much before taking the online hardest negative
# of the adaptive weights (docs/reference_behaviours.md, "diagonal offset").
DIAGONAL_OFFSET = 10.0


def online_hardest_negatives(scores):
    """Hardest in-batch negatives: (max_{j!=b} S[b,j], max_{i!=b} S[i,b]), each (B,).

    The diagonal is excluded with a mask, so with B = 1 both are -inf and every online hinge is 0,
    as in the reference (whose masked hinge row then holds only a zero).
    """
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    masked = scores.masked_fill(eye, float("-inf"))  # (B, B)
    return masked.max(dim=1).values, masked.max(dim=0).values


def weight_hardest_negatives(scores):
    """The online scores the adaptive weights use, as the reference: max of S - 10 I, each (B,).

    For B >= 2 and scores within a range narrower than 10 (cosine, SCAN, BFAN) this equals
    `online_hardest_negatives`; with B = 1 it is the positive minus 10, a finite weight that
    multiplies a zero hinge, where -inf would give -inf * 0 = NaN.
    """
    eye = torch.eye(scores.shape[0], dtype=scores.dtype, device=scores.device)
    shifted = scores - DIAGONAL_OFFSET * eye  # (B, B)
    return shifted.max(dim=1).values, shifted.max(dim=0).values


def adaptive_weight(offline, online, alpha, beta):
    """AOQ weight of an online hinge: beta - (offline - online) / alpha (unclamped, docs/method.md)."""
    return beta - (offline - online) / alpha


def adaptive_weights(scores, offline, cfg):
    """The AdapOffQuin weights of a batch's online hinges: (image anchors, caption anchors), each (B,).

    `retrieval_loss` multiplies its hinges by these; training logs their mean (TensorBoard).
    Scores in reduced precision are promoted to float32 first, as the loss does.
    """
    scores = _at_least_fp32(scores)
    on_t, on_i = weight_hardest_negatives(scores)
    off_t, off_i = _at_least_fp32(offline.off_t), _at_least_fp32(offline.off_i)
    if cfg.detach_weights:
        off_t, off_i, on_t, on_i = off_t.detach(), off_i.detach(), on_t.detach(), on_i.detach()
    w_t = adaptive_weight(off_t, on_t, cfg.alpha, cfg.beta)  # (B,)
    w_i = adaptive_weight(off_i, on_i, cfg.alpha, cfg.beta)  # (B,)
    return w_t, w_i


def _online_sum_all(scores, positive, margin):
    """VSE0: hinge summed over every in-batch negative, both directions, diagonal excluded."""
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = hinge(margin, scores, positive[:, None]).masked_fill(eye, 0)  # image anchors
    cost_image = hinge(margin, scores, positive[None, :]).masked_fill(eye, 0)  # caption anchors
    return cost_caption.sum() + cost_image.sum()


def retrieval_loss(scores, offline, cfg):
    """Loss of one batch. scores (B, B); offline an OfflineScores or None (baseline).

    Returns (loss, terms) where terms maps each term's name to its batch sum (detached), for logs.
    Scores computed in reduced precision (autocast) are promoted to float32 first: every hinge,
    max and sum runs in at least float32.
    """
    flags = VARIANTS[cfg.variant]
    if cfg.needs_offline and offline is None:
        raise ValueError(f"loss variant {cfg.variant!r} needs offline scores")
    scores = _at_least_fp32(scores)
    if offline is not None:
        offline = OfflineScores(
            *(_at_least_fp32(x) for x in (offline.off_t, offline.off_i, offline.quin_a, offline.quin_b))
        )
    positive = scores.diagonal()  # (B,)
    terms = {}
    if not cfg.max_violation:
        total = _online_sum_all(scores, positive, cfg.margin_online)
        terms["online"] = total
    else:
        on_t, on_i = online_hardest_negatives(scores)
        h_t = hinge(cfg.margin_online, on_t, positive)  # image anchor, hardest caption
        h_i = hinge(cfg.margin_online, on_i, positive)  # caption anchor, hardest image
        if flags.adaptive:
            w_t, w_i = adaptive_weights(scores, offline, cfg)
            h_t, h_i = w_t * h_t, w_i * h_i
        total = h_t.sum() + h_i.sum()
        terms["online"] = total
    if flags.offline_triplet:
        offtri = (
            hinge(cfg.margin_offline, offline.off_t, positive).sum()
            + hinge(cfg.margin_offline, offline.off_i, positive).sum()
        )
        terms["offline_triplet"] = offtri
        total = total + offtri
    if flags.quintuplet:
        quin = (
            hinge(cfg.margin_offline, offline.quin_a, positive).sum()
            + hinge(cfg.margin_offline, offline.quin_b, positive).sum()
        )
        terms["quintuplet"] = quin
        total = total + quin
    return total, {name: value.detach() for name, value in terms.items()}
