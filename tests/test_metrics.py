"""Tests for pipeline_steps.retrieval.metrics against a per-query full-sort reference."""

import numpy as np
import pytest
import torch

from pipeline_steps.retrieval import metrics as M
from pipeline_steps.retrieval import scorers


def exact_gaussian(rng, n, d):
    """Gaussian-like embeddings on a 2**-10 grid, |x| <= 1, d <= 8.

    Every dot product (and the sum of two) is then exact in float32 whatever the summation
    order, so the float32 scorer and the float64 reference see identical scores.
    """
    assert d <= 8
    return np.clip(np.round(rng.standard_normal((n, d)) * 300), -1024, 1024) / 1024.0


def reference_ranks(S):
    """Ranks as the reference evaluation: per query, `argsort(d)[::-1]` with a stable sort (so
    among equal scores the higher index comes first), rank = position of the ground truth
    (i2t: the best of the image's 5 captions). S is (n, 5n)."""
    n_img, n_cap = S.shape
    i2t = np.empty(n_img, dtype=np.int64)
    for q in range(n_img):
        order = np.argsort(S[q], kind="stable")[::-1]
        i2t[q] = min(int(np.nonzero(order == c)[0][0]) for c in range(5 * q, 5 * q + 5))
    t2i = np.empty(n_cap, dtype=np.int64)
    for c in range(n_cap):
        order = np.argsort(S[:, c], kind="stable")[::-1]
        t2i[c] = int(np.nonzero(order == c // 5)[0][0])
    return i2t, t2i


def has_ties(S):
    """True if some score ties with a ground-truth score (then the tie rule decides the rank)."""
    for q in range(S.shape[0]):
        best = S[q, 5 * q : 5 * q + 5].max()
        if np.any(np.delete(S[q], np.arange(5 * q, 5 * q + 5)) == best):
            return True
    return any(np.sum(S[:, c] == S[c // 5, c]) != 1 for c in range(S.shape[1]))


def make_data(seed, n_img=50, d=8):
    """Embeddings whose exact scores have no ties with the ground truth (redrawn until so)."""
    rng = np.random.default_rng(seed)
    while True:
        img, cap = exact_gaussian(rng, n_img, d), exact_gaussian(rng, 5 * n_img, d)
        S = img @ cap.T
        if not has_ties(S):
            return img, cap, S


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", [1, 3, 7, None])
def test_ranks_match_full_sort(seed, block_size):
    img, cap, S = make_data(seed)
    i2t, t2i = M.retrieval_ranks(scorers.embedding_scorer(img, cap), block_size=block_size)
    ref_i2t, ref_t2i = reference_ranks(S)
    assert i2t.dtype == np.int64 and t2i.dtype == np.int64
    assert i2t.shape == (50,) and t2i.shape == (250,)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_max_block_elems_bounds_blocks():
    img, cap, S = make_data(3, n_img=20)
    inner = scorers.embedding_scorer(torch.from_numpy(img), torch.from_numpy(cap))
    seen = []

    def spy(i0, i1, c0, c1):
        seen.append((i1 - i0) * (c1 - c0))
        return inner(i0, i1, c0, c1)

    i2t, t2i = M.retrieval_ranks(scorers.Scorer(20, spy), max_block_elems=300)
    assert max(seen) <= 300
    ref = reference_ranks(S)
    np.testing.assert_array_equal(i2t, ref[0])
    np.testing.assert_array_equal(t2i, ref[1])


def test_recall_metrics_by_hand():
    m = M.recall_metrics(np.array([0, 1, 4, 9, 20]), np.array([0, 3, 5, 12]))
    assert m["i2t_r1"] == pytest.approx(20.0)
    assert m["i2t_r5"] == pytest.approx(60.0)
    assert m["i2t_r10"] == pytest.approx(80.0)
    assert m["i2t_medr"] == 5.0
    assert m["i2t_meanr"] == pytest.approx(7.8)
    # Even count: median = (3 + 5) / 2 = 4 -> medr 5; ranks 0..12 -> meanr 5 + 1.
    assert m["t2i_r1"] == pytest.approx(25.0)
    assert m["t2i_r5"] == pytest.approx(50.0)
    assert m["t2i_r10"] == pytest.approx(75.0)
    assert m["t2i_medr"] == 5.0
    assert m["t2i_meanr"] == pytest.approx(6.0)
    assert m["rsum"] == pytest.approx(20 + 60 + 80 + 25 + 50 + 75)
    # Even count with a fractional median: (1 + 4) / 2 = 2.5 -> floor 2 -> medr 3.
    assert M.recall_metrics(np.array([0, 1, 4, 9]), np.array([0]))["i2t_medr"] == 3.0
    assert all(isinstance(v, float) for v in m.values())
    assert set(m) == {f"{d}_{k}" for d in ("i2t", "t2i") for k in ("r1", "r5", "r10", "medr", "meanr")} | {
        "rsum"
    }


def reference_metrics(S):
    i2t, t2i = reference_ranks(S)
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(r < k)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10))
    return out


@pytest.mark.parametrize("seed", [4, 5])
def test_five_fold_is_mean_of_sliced_folds(seed):
    img, cap, _ = make_data(seed, n_img=60)
    res = M.evaluate(scorers.embedding_scorer(img, cap), "5fold", block_size=4)
    folds = []
    for f in range(5):
        fi, fc = img[12 * f : 12 * (f + 1)], cap[60 * f : 60 * (f + 1)]
        folds.append(reference_metrics(fi @ fc.T))
    assert len(res["folds"]) == 5
    for got, ref in zip(res["folds"], folds):
        assert got == pytest.approx(ref)
    for key in folds[0]:
        if key != "rsum":
            assert res[key] == pytest.approx(np.mean([f[key] for f in folds]))
    six = [res[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10)]
    assert res["rsum"] == pytest.approx(sum(six))
    # 'full' on the same scorer uses the whole 60 x 300 matrix.
    full = M.evaluate(scorers.embedding_scorer(img, cap), "full")
    assert full == pytest.approx(reference_metrics(img @ cap.T))


def test_ensemble_is_mean_of_score_matrices():
    rng = np.random.default_rng(7)
    n = 40
    a_img, a_cap = exact_gaussian(rng, n, 8), exact_gaussian(rng, 5 * n, 8)
    b_img, b_cap = exact_gaussian(rng, n, 5), exact_gaussian(rng, 5 * n, 5)
    S = (a_img @ a_cap.T + b_img @ b_cap.T) / 2
    assert not has_ties(S)
    scorer = scorers.ensemble_scorer(
        [scorers.embedding_scorer(a_img, a_cap), scorers.embedding_scorer(b_img, b_cap)]
    )
    # Ranks are scale-invariant, so check the block values are the mean (not the sum) directly.
    np.testing.assert_array_equal(scorer(3, 9, 10, 40).numpy(), S[3:9, 10:40])
    i2t, t2i = M.retrieval_ranks(scorer, block_size=6)
    ref_i2t, ref_t2i = reference_ranks(S)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)
    assert M.evaluate(scorer, "full") == pytest.approx(reference_metrics(S))


def test_val_score4():
    m = {"i2t_r1": 1.0, "i2t_r5": 2.0, "i2t_r10": 100.0, "t2i_r1": 3.0, "t2i_r5": 4.0, "t2i_r10": 100.0}
    assert M.val_score4(m) == 10.0


def test_errors():
    rng = np.random.default_rng(0)
    img, cap = rng.standard_normal((10, 4)), rng.standard_normal((50, 4))
    with pytest.raises(ValueError, match="captions per image"):
        scorers.embedding_scorer(img, cap[:49])
    with pytest.raises(ValueError, match="dims"):
        scorers.embedding_scorer(img, rng.standard_normal((50, 3)))
    scorer = scorers.embedding_scorer(img, cap)
    with pytest.raises(ValueError, match="at least one image"):
        M.retrieval_ranks(scorers.Scorer(0, scorer))
    with pytest.raises(ValueError, match="protocol"):
        M.evaluate(scorer, "1k")
    with pytest.raises(ValueError, match="divisible"):
        M.evaluate(scorers.embedding_scorer(img[:8], cap[:40]), "5fold")
    with pytest.raises(ValueError, match="shape"):
        M.retrieval_ranks(scorers.Scorer(10, lambda i0, i1, c0, c1: torch.zeros(1, 1)))
    with pytest.raises(ValueError, match="different numbers"):
        scorers.ensemble_scorer([scorer, scorers.embedding_scorer(img[:5], cap[:25])])
    with pytest.raises(ValueError):
        scorers.ensemble_scorer([])
