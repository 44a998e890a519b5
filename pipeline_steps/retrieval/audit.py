"""How hard, and how safe, are the offline candidates? (docs/mining_audit.md)

Everything here is one pass over the embeddings and the candidate files, in blocks of anchors:
the candidates' scores are recomputed only for the first columns the audit looks at, so memory is
bounded by a block of (anchors x columns x embedding width), never a full images x captions
matrix.

Terms. An anchor is a training image (i2t: its candidates are captions) or a training caption
(t2i: its candidates are images). Caption c belongs to image c // 5. "Top-K" is the part of a
candidate row AOQ draws its offline negatives from: offline_size captions per image, and
ceil(offline_size / 5) images per caption (docs/method.md).
"""

import numpy as np
import torch

from pipeline_steps.common.errors import InputError
from pipeline_steps.data.batches import epoch_batches
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE

RANKS = (1, 10, 100, 300)
TIE_TOLERANCE = 1e-5
QUANTILES = {"p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}


def summary(values):
    """Mean and quantiles of a 1-D sample (finite values only), as plain floats."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return {"n": 0}
    out = {"n": int(len(values)), "mean": float(values.mean())}
    out.update({name: float(v) for name, v in zip(QUANTILES, np.quantile(values, list(QUANTILES.values())))})
    return out


def caption_groups(ids, offsets):
    """Group id per caption: captions with identical token ids (after the pipeline's own
    tokenization) share one. Exact: token sequences are compared as bytes, not hashed."""
    ids = np.asarray(ids)
    seen = {}
    return np.array(
        [
            seen.setdefault(ids[offsets[c] : offsets[c + 1]].tobytes(), len(seen))
            for c in range(len(offsets) - 1)
        ],
        dtype=np.int64,
    )


def load_caption_groups(path, n_cap):
    """caption_groups of a prepared `train_ids.npz`, which must hold `n_cap` captions."""
    with np.load(path) as ids:
        if len(ids["offsets"]) != n_cap + 1:
            raise InputError(f"{path}: {len(ids['offsets']) - 1} captions, the embeddings have {n_cap}")
        return caption_groups(ids["ids"], ids["offsets"])


def in_batch_hardest(images, captions, batch_size, seed, family=None):
    """The online hardest negative of every training pair in one epoch of random batches (the
    training's own epoch-0 batches for `seed`): per caption c (pair c with image c // 5),
    i2t: max score of image c // 5 with the batch's captions of other images; t2i: max score of
    caption c with the batch's other images. -inf where the batch holds no other image. With
    `family` (a family id per image), also whether the batch holds another image of the anchor's
    family."""
    n_cap = len(captions)
    hardest_i2t = np.full(n_cap, -np.inf, dtype=np.float32)
    hardest_t2i = np.full(n_cap, -np.inf, dtype=np.float32)
    relative_in_batch = np.zeros(n_cap, dtype=bool) if family is not None else None
    for batch in epoch_batches(n_cap, batch_size, seed, 0):
        owners = batch // CAPTIONS_PER_IMAGE
        img = torch.from_numpy(images[owners])
        cap = torch.from_numpy(captions[batch])
        scores = (img @ cap.T).numpy()  # row: pair k's image; column: pair j's caption
        same_image = owners[:, None] == owners[None, :]
        scores[same_image] = -np.inf
        hardest_i2t[batch] = scores.max(axis=1)
        hardest_t2i[batch] = scores.max(axis=0)  # column j: caption j against the batch's images
        if family is not None:
            relatives = (family[owners][:, None] == family[owners][None, :]) & ~same_image
            relative_in_batch[batch] = relatives.any(axis=1)
    return hardest_i2t, hardest_t2i, relative_in_batch


class Direction:
    """One retrieval direction of the audit. `anchors`/`targets`: embeddings (rows); `candidates`:
    (n_anchors, K_file) ids into targets; `positives(a)`: (len(a), P) target ids that are the
    anchors' own pairs; `hardest`: (n_anchors, P) online hardest-negative scores of those pairs;
    `duplicate(a, c)`: bool (len(a), K) whether candidate c of anchor a duplicates a positive's
    caption; `images`: (anchor ids -> their images, candidate ids -> theirs), for the generator's
    families."""

    def __init__(self, name, anchors, targets, candidates, top_k, positives, hardest, duplicate, images):
        self.name, self.anchors, self.targets, self.candidates = name, anchors, targets, candidates
        self.top_k, self.positives, self.hardest, self.duplicate = top_k, positives, hardest, duplicate
        self.anchor_image, self.candidate_image = images


def own_captions(images):
    """(n,) image ids -> (n, 5) their caption ids."""
    return np.asarray(images)[..., None] * CAPTIONS_PER_IMAGE + np.arange(CAPTIONS_PER_IMAGE)


def duplicates_i2t(groups, images, candidates):
    """(n, K) bool: candidate caption identical to one of the anchor image's own captions."""
    return (groups[candidates][:, :, None] == groups[own_captions(images)][:, None, :]).any(axis=2)


def duplicates_t2i(groups, captions, candidates):
    """(n, K) bool: candidate image one of whose captions is identical to the anchor caption."""
    return (groups[own_captions(candidates)] == groups[captions][:, None, None]).any(axis=2)


def directions(images, captions, i2t, t2i, offline_size, groups, hardest_i2t, hardest_t2i):
    """The i2t and t2i halves of the audit, over the candidate files' rows."""
    per = CAPTIONS_PER_IMAGE
    return [
        Direction(
            "i2t",
            images,
            captions,
            i2t,
            offline_size,
            own_captions,
            lambda a: hardest_i2t[own_captions(a)],
            lambda a, c: duplicates_i2t(groups, a, c),
            (lambda a: a, lambda c: c // per),
        ),
        Direction(
            "t2i",
            captions,
            images,
            t2i,
            -(-offline_size // per),
            lambda a: (a // per)[:, None],
            lambda a: hardest_t2i[a][:, None],
            lambda a, c: duplicates_t2i(groups, a, c),
            (lambda a: a // per, lambda c: c),
        ),
    ]


def _distinct_per_row(values):
    """Number of distinct non-negative values per row (negative = absent)."""
    ordered = np.sort(values, axis=1)
    new = np.ones_like(ordered, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return (new & (ordered >= 0)).sum(axis=1)


def _scores(anchor, targets, ids):
    """anchor (b, d), ids (b, m) -> (b, m) scores of each anchor with its targets. numpy's
    einsum: many short dot products, where torch's batched products are several times slower."""
    return np.einsum("bd,bmd->bm", anchor, targets[ids])


def count_above(anchor, targets, rows, thresholds):
    """(b, P): how many of each row's candidates score above each of its P thresholds, by
    binary search: rows are sorted by decreasing score, so only about log2(K) candidates per
    threshold are scored instead of K (the audit's cost is these gathers)."""
    b, k = rows.shape
    p = thresholds.shape[1]
    lo, hi = np.zeros((b, p), dtype=np.int64), np.full((b, p), k, dtype=np.int64)
    row = np.arange(b)[:, None]
    while (open_ := lo < hi).any():
        mid = np.minimum((lo + hi) // 2, k - 1)
        above = _scores(anchor, targets, rows[row, mid]) > thresholds
        lo = np.where(open_ & above, mid + 1, lo)
        hi = np.where(open_ & ~above, mid, hi)
    return lo


def audit_direction(d, ranks=RANKS, family=None, block_elems=1 << 22):
    """Statistics of one direction over all its anchors, in blocks of anchors. Candidate rows are
    sorted by decreasing score (the miner's layout), so counts are binary searches and only a few
    columns are ever scored; `sorted_rows_share` checks that layout on the columns scored."""
    n, k_file = d.candidates.shape
    top_k = min(d.top_k, k_file)
    ranks = [r for r in ranks if r <= k_file]
    # Checked for decreasing scores: the ranks' columns and both ends of the top-K.
    columns = sorted({0, 1, top_k - 1} | {r - 1 for r in ranks})
    width = d.anchors.shape[1]
    # A block's largest gathers: the checked columns, and 5 positives per image in each search step.
    block = max(1, block_elems // (max(len(columns), CAPTIONS_PER_IMAGE) * width))
    if family is not None:
        family_size = np.bincount(family)
    rank_scores = {r: np.empty(n, dtype=np.float32) for r in ranks}
    offline_rank, above_positive, duplicates, sorted_rows = [], 0, 0, 0
    found, relatives = 0, 0
    for start in range(0, n, block):
        a = np.arange(start, min(n, start + block))
        rows = np.asarray(d.candidates[start : a[-1] + 1, : max(columns) + 1], dtype=np.int64)
        top = rows[:, :top_k]
        anchor = d.anchors[a]
        scores = _scores(anchor, d.targets, rows[:, columns])
        for r in ranks:
            rank_scores[r][a] = scores[:, columns.index(r - 1)]
        sorted_rows += int((np.diff(scores, axis=1) <= 1e-5).all(axis=1).sum())
        positive = _scores(anchor, d.targets, d.positives(a))  # (b, P)
        above_positive += int(count_above(anchor, d.targets, top, positive).sum())
        # The rank the online hardest negative would have among the offline candidates: 1 + those
        # scoring above it (top_k + 1: not among the top-K). That negative is usually a candidate
        # itself, scored here by another kernel: TIE_TOLERANCE keeps rounding from ranking it
        # above itself.
        offline_rank.append(1 + count_above(anchor, d.targets, top, d.hardest(a) + TIE_TOLERANCE).ravel())
        duplicates += int(d.duplicate(a, top).sum())
        if family is not None:
            own = d.anchor_image(a)
            members = d.candidate_image(top)
            relative = (family[members] == family[own][:, None]) & (members != own[:, None])
            found += int(_distinct_per_row(np.where(relative, members, -1)).sum())
            relatives += int((family_size[family[own]] - 1).sum())
    offline_rank = np.concatenate(offline_rank)
    pairs = len(offline_rank)
    return {
        "anchors": int(n),
        "top_k": int(top_k),
        "scores_at_rank": {str(r): summary(rank_scores[r]) for r in ranks},
        "online_hardest": summary(d.hardest(np.arange(n)).ravel()),
        "online_hardest_offline_rank": {
            "median": float(np.median(offline_rank)),
            "share_beyond_top_k": float((offline_rank > top_k).mean()),
        },
        "duplicate_caption_share": duplicates / (n * top_k),
        "above_positive_share": above_positive / (pairs * top_k),
        "family_recall": found / relatives if family is not None and relatives else None,
        "sorted_rows_share": sorted_rows / n,
    }


def overlap_at_k(first, second, k, block_rows=4096):
    """Mean over rows of |top-k(first) & top-k(second)| / k (rows hold distinct ids)."""
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"the candidate sets have {first.shape[0]} and {second.shape[0]} rows")
    k = min(k, first.shape[1], second.shape[1])
    shared = 0
    for start in range(0, first.shape[0], block_rows):
        both = np.sort(
            np.concatenate(
                [first[start : start + block_rows, :k], second[start : start + block_rows, :k]], 1
            ),
            1,
        )
        shared += int((both[:, 1:] == both[:, :-1]).sum())
    return shared / (first.shape[0] * k)
