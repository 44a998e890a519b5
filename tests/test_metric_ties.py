"""Ranks on tied scores follow the reference's order (argsort(d)[::-1], stable): among equal
scores the higher index ranks first, so a tie never goes to the ground truth by rule and a
collapsed model scores as badly as it is. Checked against a per-query stable-argsort loop."""

import numpy as np
import pytest
import torch

from accel import topk
from pipeline_steps.retrieval import metrics as M
from pipeline_steps.retrieval import scorers
from tests.test_metrics import reference_metrics, reference_ranks


def tied_scores(kind, n_img, seed=0):
    """(n_img, 5 n_img) float32 scores: 'rounded' to a 1/20 grid (ties everywhere), or 'equal'."""
    if kind == "equal":
        return np.zeros((n_img, 5 * n_img), dtype=np.float32)
    rng = np.random.default_rng(seed)
    return (np.round(rng.uniform(-1, 1, (n_img, 5 * n_img)) * 20) / 20).astype(np.float32)


def matrix_scorer(S):
    """A scorer handing out blocks of a fixed matrix: the loop below sees the very same floats."""

    def score_block(i0, i1, c0, c1):
        return torch.from_numpy(np.ascontiguousarray(S[i0:i1, c0:c1]))

    return scorers.Scorer(S.shape[0], score_block)


@pytest.fixture(params=["native", "torch"])
def counting_path(request, monkeypatch):
    if request.param == "native" and topk.load_kernel() is None:
        pytest.skip("no C compiler: the native kernel cannot be built here")
    if request.param == "torch":
        monkeypatch.setattr(topk, "load_kernel", lambda: None)
    return request.param


@pytest.mark.parametrize("kind", ["rounded", "equal"])
@pytest.mark.parametrize("block_size", [1, 7, None])
def test_full_protocol_ranks_match_the_stable_argsort_loop(counting_path, kind, block_size):
    S = tied_scores(kind, 30)
    assert len(np.unique(S)) <= 41  # heavily tied
    i2t, t2i = M.retrieval_ranks(matrix_scorer(S), block_size=block_size)
    want_i2t, want_t2i = reference_ranks(S.astype(np.float64))
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)


@pytest.mark.parametrize("kind", ["rounded", "equal"])
def test_five_fold_protocol_matches_the_loop_per_fold(counting_path, kind):
    S = tied_scores(kind, 40, seed=3)
    got = M.evaluate(matrix_scorer(S), "5fold", block_size=3)
    for f, fold in enumerate(got["folds"]):
        own = S[8 * f : 8 * (f + 1), 40 * f : 40 * (f + 1)].astype(np.float64)
        assert fold == pytest.approx(reference_metrics(own))


def test_collapsed_model_scores_as_the_loop_scores_it(counting_path):
    """The audit's example: 100 images, every score equal. The order puts captions 499, 498, ...
    first, so only images 98 and 99 find a caption in their top 10 (i2t R@1/5/10 = 1, 1, 2) and
    only captions of the last images find theirs (t2i 1, 5, 10): rsum 20, not 600."""
    got = M.evaluate(scorers.embedding_scorer(np.zeros((100, 8), "f4"), np.zeros((500, 8), "f4")), "full")
    assert got == pytest.approx(reference_metrics(np.zeros((100, 500))))
    assert [got[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")] == pytest.approx(
        [1, 1, 2, 1, 5, 10]
    )
    assert got["rsum"] == pytest.approx(20.0)


def test_ties_among_the_five_own_captions(counting_path):
    """Image 0's captions 0 and 3 tie at the best score with caption 7 of image 1: the order is
    7, 3, 0, so image 0's rank is 1 (caption 3 first among its own), not 0 and not 2."""
    S = np.full((2, 10), -1.0, dtype=np.float32)
    S[0, [0, 3, 7]] = 0.5
    S[1, 5:] = 0.9

    i2t, t2i = M.retrieval_ranks(matrix_scorer(S))
    want_i2t, want_t2i = reference_ranks(S.astype(np.float64))
    assert i2t[0] == 1 == want_i2t[0]
    np.testing.assert_array_equal(t2i, want_t2i)
