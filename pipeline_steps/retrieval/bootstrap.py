"""Paired bootstrap intervals of rsum differences (docs/evaluation.md#statistics).

rsum is a mean over test images: with v_i = 100 * (sum over K of [i2t rank_i < K] + the mean over
the image's 5 captions of the sum over K of [t2i rank < K]), K in {1, 5, 10}, rsum = mean_i v_i.
This holds for the 5-fold protocol too (equal folds: the mean of fold means is the mean), so an
image with its five captions is the unit a bootstrap resamples. Two methods evaluated on the same
images (and, per seed, compared with the baseline of the same seed) give per-image differences d_i
(averaged over seeds); the interval is the percentile interval of mean(d) over resamples of the
images with replacement.
"""

import numpy as np

from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE
from pipeline_steps.retrieval.metrics import RECALL_KS

RESAMPLES_PER_BLOCK = 256  # resamples drawn at once: memory is this x the number of images


def per_image_rsum(i2t_ranks, t2i_ranks):
    """v_i (float64, one per image): the image's share of rsum, so that rsum = v.mean()."""
    i2t = np.asarray(i2t_ranks)
    t2i = np.asarray(t2i_ranks).reshape(len(i2t), CAPTIONS_PER_IMAGE)
    hits_i2t = sum((i2t < k).astype(np.float64) for k in RECALL_KS)
    hits_t2i = sum((t2i < k).astype(np.float64) for k in RECALL_KS).mean(axis=1)
    return 100.0 * (hits_i2t + hits_t2i)


def bootstrap_means(values, resamples, seed):
    """Means of `values` over `resamples` resamples of its entries with replacement (float64)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, RESAMPLES_PER_BLOCK):
        stop = min(start + RESAMPLES_PER_BLOCK, resamples)
        picks = rng.integers(0, len(values), size=(stop - start, len(values)))
        means[start:stop] = values[picks].mean(axis=1)
    return means


def interval(values, resamples=10000, seed=0, level=0.95):
    """(mean, low, high): the mean of `values` and its percentile bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"need a non-empty 1-D array of per-image values, got shape {values.shape}")
    mean = float(values.mean())
    if values.min() == values.max():  # every resample has this mean; rounding must not blur it
        return mean, mean, mean
    means = bootstrap_means(values, resamples, seed)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return mean, float(low), float(high)


def verdict(low, high):
    """'better' / 'worse' when the interval excludes 0, else 'no clear difference'."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no clear difference"
