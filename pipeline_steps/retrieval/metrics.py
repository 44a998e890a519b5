"""Exact image-text retrieval ranks and recall metrics, computed block by block (docs/evaluation.md).

Everything is driven by a `Scorer` (scorers.py): rectangles of the image x caption score matrix
of n_img images and their 5 n_img captions (caption c belongs to image c // 5). Embedding models
and cross-attention models (which cannot produce one vector per item) are evaluated by the same
code. The full n_img x 5 n_img matrix is never materialised: a block holds at most about
`max_block_elems` scores.
"""

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from accel import topk
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE

RECALL_KS = (1, 5, 10)
# The six recalls and their sum, in the order tables print them.
RECALL_COLUMNS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS] + ["rsum"]
DEFAULT_MAX_BLOCK_ELEMS = 2**24  # 64 MiB of float32 scores per block
POSITIVE_BLOCK_IMAGES = 64  # images per diagonal block when reading the positives first


def _checked_block(score_block, i0, i1, c0, c1):
    block = score_block(i0, i1, c0, c1)
    if not isinstance(block, torch.Tensor):
        block = torch.as_tensor(np.asarray(block))
    if tuple(block.shape) != (i1 - i0, c1 - c0):
        raise ValueError(
            f"scorer returned shape {tuple(block.shape)} for images [{i0},{i1}) x "
            f"captions [{c0},{c1}); expected {(i1 - i0, c1 - c0)}"
        )
    # NaN compares False with everything and would silently give rank 0. A sum is a cheap first
    # test (NaN propagates); only a suspicious block is searched (inf - inf is NaN too).
    if torch.isnan(block.sum()) and torch.isnan(block).any():
        raise ValueError(f"scorer returned NaN in images [{i0},{i1}) x captions [{c0},{c1})")
    return block


def _queries_per_block(n_other, block_size, max_block_elems):
    """Queries per block: at most `block_size` (if given) and at most max_block_elems / n_other."""
    by_memory = max(1, max_block_elems // n_other)
    return by_memory if block_size is None else max(1, min(int(block_size), by_memory))


def _positive_scores(score_block, n_img, block_size, max_block_elems):
    """(5 n_img,) score of every caption with its own image, from small diagonal blocks."""
    g = min(POSITIVE_BLOCK_IMAGES, max(1, math.isqrt(max_block_elems // CAPTIONS_PER_IMAGE)))
    if block_size is not None:
        g = max(1, min(g, int(block_size)))
    parts = []
    for a in range(0, n_img, g):
        b = min(a + g, n_img)
        s = _checked_block(score_block, a, b, CAPTIONS_PER_IMAGE * a, CAPTIONS_PER_IMAGE * b)  # (g, 5g)
        own = CAPTIONS_PER_IMAGE * torch.arange(b - a, device=s.device)[:, None] + torch.arange(
            CAPTIONS_PER_IMAGE, device=s.device
        )  # (g, 5)
        parts.append(s.gather(1, own).reshape(-1))
    return torch.cat(parts)


def _count_native(lib, s, best_gt, row_from, pos, col_below, pool, threads):
    """(row counts (B,), column counts (C,)) of one CPU block with the compiled kernel."""
    tile = s.to(torch.float32).contiguous().numpy()
    row_thr = best_gt.to(torch.float32).contiguous().numpy()
    col_thr = pos.to(torch.float32).contiguous().numpy()
    row_from, col_below = (x.to(torch.int64).contiguous().numpy() for x in (row_from, col_below))
    rows = np.zeros(tile.shape[0], dtype=np.int64)
    edges = np.linspace(0, tile.shape[0], threads + 1).round().astype(int)
    cols = [np.zeros(tile.shape[1], dtype=np.int32) for _ in range(threads)]
    jobs = [
        pool.submit(
            topk.count_ranks,
            lib,
            tile[lo:hi],
            row_thr[lo:hi],
            row_from[lo:hi],
            col_thr,
            col_below[lo:hi],
            rows[lo:hi],
            cols[t],
        )
        for t, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))
        if hi > lo
    ]
    for job in jobs:
        job.result()
    return torch.from_numpy(rows), torch.from_numpy(np.sum(cols, axis=0, dtype=np.int64))


def _count_torch(s, best_gt, row_from, pos, col_below):
    """The same counts as `_count_native`, with torch (GPU, or CPU without a C compiler)."""
    cols = torch.arange(s.shape[1], device=s.device)
    row_ties = (s == best_gt[:, None]) & (cols[None, :] >= row_from[:, None])
    row_counts = (s > best_gt[:, None]).sum(dim=1) + row_ties.sum(dim=1)
    col_ties = (s == pos[None, :]) & (cols[None, :] < col_below[:, None])
    col_counts = (s > pos[None, :]).sum(dim=0) + col_ties.sum(dim=0)
    return row_counts, col_counts


def retrieval_ranks(scorer, block_size=None, max_block_elems=DEFAULT_MAX_BLOCK_ELEMS):
    """Exact 0-based retrieval ranks of a scorer's n_img images and their 5 * n_img captions.

    A rank is a position in the list sorted by decreasing score where, among equal scores, the
    higher index comes first: the reference's `numpy.argsort(d)[::-1]` with a stable sort
    (docs/evaluation.md). A tie therefore never goes to the ground truth by rule, and a
    collapsed model (all scores equal) scores as badly as that order says, not perfectly.
    i2t rank of image q: the best position of any of its 5 captions = the captions scoring above
    q's best caption g, plus those scoring equal to it with an index above g (g: the last of the
    5 with the best score). t2i rank of caption c: the images scoring above image c // 5, plus
    those scoring equal with an index above c // 5.

    One pass over row blocks (images [a,b) x all captions) gives both directions: each block's
    rows count captions above their best positive (i2t) and its columns add the images above each
    caption's positive (t2i), so every score is computed once. The positives themselves are read
    first from small diagonal blocks (about 64 / n_img of the work); an image is never counted
    against its own caption, whatever rounding a different block shape gives. On CPU the counts
    come from the compiled kernel when it builds (accel/topk.py), else from torch.
    `block_size` caps the number of images per block; blocks also hold at most about
    `max_block_elems` scores. Returns numpy int64 arrays (i2t_ranks (n_img,), t2i_ranks (5 n_img,)).
    """
    n_img, score_block = scorer.n_img, scorer
    if n_img < 1:
        raise ValueError(f"a scorer needs at least one image, got {n_img}")
    n_cap = CAPTIONS_PER_IMAGE * n_img
    gt_offsets = torch.arange(CAPTIONS_PER_IMAGE)
    i2t = np.empty(n_img, dtype=np.int64)
    t2i = None
    rows = _queries_per_block(n_cap, block_size, max_block_elems)
    lib = topk.load_kernel()
    threads = max(1, torch.get_num_threads())
    with torch.no_grad(), ThreadPoolExecutor(max_workers=threads) as pool:
        pos = _positive_scores(score_block, n_img, block_size, max_block_elems)  # (N_cap,)
        for a in range(0, n_img, rows):
            b = min(a + rows, n_img)
            s = _checked_block(score_block, a, b, 0, n_cap)  # (B, N_cap)
            pos = pos.to(s.device)
            local = torch.arange(b - a, device=s.device)
            gt_cols = CAPTIONS_PER_IMAGE * (local + a)[:, None] + gt_offsets.to(s.device)  # (B, 5)
            # i2t positives are read from this very block, so they are compared with themselves.
            own = s.gather(1, gt_cols)  # (B, 5)
            best_gt = own.max(dim=1).values  # (B,)
            # The last of the 5 with the best score ranks first among them; captions after it
            # that tie with it rank above it.
            last_best = (CAPTIONS_PER_IMAGE - 1) - (own == best_gt[:, None]).flip(1).to(torch.uint8).argmax(
                dim=1
            )
            row_from = gt_cols[:, 0] + last_best + 1  # (B,)
            col_below = gt_cols[:, 0]  # (B,) captions of earlier images: this image ties above them
            if lib is not None and s.device.type == "cpu":
                row_counts, col_counts = _count_native(
                    lib, s, best_gt, row_from, pos, col_below, pool, threads
                )
            else:
                row_counts, col_counts = _count_torch(s, best_gt, row_from, pos, col_below)
            i2t[a:b] = row_counts.cpu().numpy()
            # Never count an image against its own caption (its score here may differ from the
            # diagonal block's by rounding).
            own_above = own > pos[CAPTIONS_PER_IMAGE * a : CAPTIONS_PER_IMAGE * b].view(
                b - a, CAPTIONS_PER_IMAGE
            )
            col_counts = col_counts.to(s.device)
            col_counts[CAPTIONS_PER_IMAGE * a : CAPTIONS_PER_IMAGE * b] -= own_above.reshape(-1).to(
                col_counts.dtype
            )
            t2i = col_counts if t2i is None else t2i + col_counts
    return i2t, t2i.cpu().numpy().astype(np.int64)


def _rank_summary(ranks, prefix):
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"{prefix} ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    out = {f"{prefix}_r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(math.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks) + 1)
    return out


def recall_metrics(i2t_ranks, t2i_ranks):
    """Recall metrics from 0-based ranks.

    R@K = 100 * fraction of ranks < K (K = 1, 5, 10); medr = floor(median) + 1 (numpy median,
    i.e. mean of the two middle values for an even count); meanr = mean + 1; rsum = sum of
    the six R@K. Returns a dict of python floats with keys i2t_r1, i2t_r5, i2t_r10, i2t_medr,
    i2t_meanr, the same for t2i, and rsum.
    """
    out = _rank_summary(i2t_ranks, "i2t")
    out.update(_rank_summary(t2i_ranks, "t2i"))
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    return out


def evaluate(scorer, protocol, block_size=None, max_block_elems=DEFAULT_MAX_BLOCK_ELEMS):
    """Retrieval metrics of a scorer under an evaluation protocol.

    'full': all n_img images against all 5 * n_img captions -> recall_metrics dict.
    '5fold' (COCO 1K): n_img must be divisible by 5; fold f holds images
    [f n/5, (f+1) n/5) and their captions, scored only against each other. Each metric is the
    arithmetic mean over the 5 folds, rsum is the sum of the six mean recalls, and 'folds' holds
    the 5 per-fold dicts.
    """
    return evaluate_with_ranks(scorer, protocol, block_size, max_block_elems)[0]


def ranks_path(metrics_path):
    """Where the per-query ranks of a metrics JSON live: x.json -> x.ranks.npz."""
    text = str(metrics_path)
    return (text[: -len(".json")] if text.endswith(".json") else text) + ".ranks.npz"


def evaluate_with_ranks(scorer, protocol, block_size=None, max_block_elems=DEFAULT_MAX_BLOCK_ELEMS):
    """(metrics as `evaluate`, i2t ranks per image, t2i ranks per caption): the 0-based ranks of
    the protocol (for 5-fold, each within its fold, in the split's order). The per-query ranks
    are what the report's paired bootstrap resamples (pipeline_steps/retrieval/bootstrap.py)."""
    n_img = scorer.n_img
    if n_img < 1:
        raise ValueError(f"a scorer needs at least one image, got {n_img}")
    if protocol == "full":
        i2t, t2i = retrieval_ranks(scorer, block_size, max_block_elems)
        return recall_metrics(i2t, t2i), np.asarray(i2t), np.asarray(t2i)
    if protocol != "5fold":
        raise ValueError(f"unknown protocol {protocol!r}: expected 'full' or '5fold'")
    n_folds = 5
    if n_img % n_folds:
        raise ValueError(f"protocol '5fold' needs n_img divisible by {n_folds}, got {n_img}")
    fold_size = n_img // n_folds
    folds, ranks = [], []
    for f in range(n_folds):
        ranks.append(retrieval_ranks(scorer.fold(f * fold_size, fold_size), block_size, max_block_elems))
        folds.append(recall_metrics(*ranks[-1]))
    out = {key: float(np.mean([fold[key] for fold in folds])) for key in folds[0] if key != "rsum"}
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))
    out["folds"] = folds
    i2t = np.concatenate([np.asarray(r[0]) for r in ranks])
    t2i = np.concatenate([np.asarray(r[1]) for r in ranks])
    return out, i2t, t2i


def val_score4(metrics):
    """Model-selection score of the reference code: i2t R@1 + R@5 + t2i R@1 + R@5 (no R@10)."""
    return float(metrics["i2t_r1"] + metrics["i2t_r5"] + metrics["t2i_r1"] + metrics["t2i_r5"])
