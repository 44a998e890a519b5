"""The one-pass rank computation: torch and native counting paths, ties, rounding of positives."""

import numpy as np
import pytest

from accel import topk
from pipeline_steps.retrieval import metrics as M
from pipeline_steps.retrieval import scorers


def count_ranks(S):
    """Brute force by counting, with the reference's tie rule (equal scores: higher index first):
    i2t = min over the 5 own captions g of #(above g) + #(equal to g with a higher index);
    t2i = #images above the own image + #images equal to it with a higher index."""
    n_img, n_cap = S.shape
    idx_cap, idx_img = np.arange(n_cap), np.arange(n_img)
    i2t = np.array(
        [
            min(
                np.sum(S[q] > S[q, g]) + np.sum((S[q] == S[q, g]) & (idx_cap > g))
                for g in range(5 * q, 5 * q + 5)
            )
            for q in range(n_img)
        ]
    )
    t2i = np.array(
        [
            np.sum(S[:, c] > S[c // 5, c]) + np.sum((S[:, c] == S[c // 5, c]) & (idx_img > c // 5))
            for c in range(n_cap)
        ]
    )
    return i2t, t2i


def integer_scorer(seed, n_img, spread=2, d=5):
    """Small-integer embeddings: exact scores, ties everywhere."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-spread, spread + 1, (n_img, d)).astype(np.float32)
    cap = rng.integers(-spread, spread + 1, (5 * n_img, d)).astype(np.float32)
    return scorers.embedding_scorer(img, cap), img.astype(np.float64) @ cap.astype(np.float64).T


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("block_size", [1, 4, None])
def test_both_counting_paths_match_brute_force_with_ties(monkeypatch, native, block_size):
    if native and topk.load_kernel() is None:
        pytest.skip("no C compiler: the native kernel cannot be built here")
    if not native:
        monkeypatch.setattr(topk, "load_kernel", lambda: None)
    scorer, S = integer_scorer(0, 37)
    i2t, t2i = M.retrieval_ranks(scorer, block_size=block_size)
    ref_i2t, ref_t2i = count_ranks(S)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_own_image_never_counted_when_positive_rounds_differently():
    """A scorer whose diagonal blocks give each positive a hair less than the big blocks do (as a
    GEMM of another shape may): the image must still not be counted above its own caption."""
    n = 100
    scorer, S = integer_scorer(1, n)

    def shaky(i0, i1, c0, c1):
        block = scorer(i0, i1, c0, c1).clone()
        if c1 - c0 < 5 * n:  # a diagonal block of the positives' pre-pass
            block -= 1e-3
        return block

    i2t, t2i = M.retrieval_ranks(scorers.Scorer(n, shaky), max_block_elems=10_000)
    # Others are compared with the (lowered) positive: scores equal to it now count, own never.
    lowered = np.array([np.sum(np.delete(S[:, c], c // 5) > S[c // 5, c] - 1e-3) for c in range(5 * n)])
    assert not np.array_equal(lowered, count_ranks(S)[1])  # the lowering matters here
    np.testing.assert_array_equal(t2i, lowered)
    np.testing.assert_array_equal(i2t, count_ranks(S)[0])


def test_every_score_computed_once_plus_the_diagonal():
    scorer, _ = integer_scorer(2, 200)
    area = []

    def spy(i0, i1, c0, c1):
        area.append((i1 - i0) * (c1 - c0))
        return scorer(i0, i1, c0, c1)

    M.retrieval_ranks(scorers.Scorer(200, spy), max_block_elems=50_000)
    full = 200 * 1000
    diagonal = sum(min(64, 200 - a) * 5 * min(64, 200 - a) for a in range(0, 200, 64))
    assert sum(area) == full + diagonal  # the old two-pass code scored 2 * full
