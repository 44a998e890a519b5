"""False-negative control (mining.exclude: duplicate_captions, docs/mining_audit.md): drop the
candidates whose caption is identical to one of the anchor's positives before the files are
written. Exact: the miner is asked for enough extra columns that every row keeps k candidates
after the drop, so each row is the true top-k of the candidates that are not duplicates."""

import numpy as np

from pipeline_steps.retrieval.audit import CAPTIONS_PER_IMAGE, duplicates_i2t, duplicates_t2i


def duplicate_counts(groups):
    """How many candidates each anchor will have flagged: i2t, per image, the captions of other
    images identical to one of its own; t2i, per caption, the other images holding an identical
    caption. `groups`: a group id per caption (audit.caption_groups)."""
    n_cap = len(groups)
    size = np.bincount(groups)
    own = np.sort(groups.reshape(-1, CAPTIONS_PER_IMAGE), axis=1)
    first = np.ones_like(own, dtype=bool)
    first[:, 1:] = own[:, 1:] != own[:, :-1]
    # Every group of an image's captions holds those captions themselves: 5 in all.
    per_image = np.where(first, size[own], 0).sum(axis=1) - CAPTIONS_PER_IMAGE
    pairs = np.unique(np.stack([groups, np.arange(n_cap) // CAPTIONS_PER_IMAGE], axis=1), axis=0)
    images_per_group = np.bincount(pairs[:, 0], minlength=len(size))
    per_caption = images_per_group[groups] - 1
    return per_image, per_caption


def keep_unflagged(candidates, flags, k):
    """The first k unflagged ids of each row, in order. Rows must hold at least k unflagged."""
    order = np.argsort(flags, axis=1, kind="stable")[:, :k]  # unflagged (False) first, order kept
    return np.take_along_axis(candidates, order, axis=1)


def write_filtered(wide, out, groups, direction, block_rows=8192):
    """Rows of `wide` (n, k + extra) without duplicate candidates, cut to out's k columns."""
    flag = duplicates_i2t if direction == "i2t" else duplicates_t2i
    k = out.shape[1]
    for start in range(0, len(wide), block_rows):
        rows = np.asarray(wide[start : start + block_rows], dtype=np.int64)
        anchors = np.arange(start, start + len(rows))
        out[start : start + len(rows)] = keep_unflagged(rows, flag(groups, anchors, rows), k)
