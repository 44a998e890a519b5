"""Tests for mining.mine_both (i2t and t2i from one pass) against brute force.

The native engine promises the first k of a stable descending sort (equal scores: lower id first),
so it is checked exactly on data full of ties; the torch engine leaves tie order open, so it is
checked on tie-free data (and by score multiset on tied data).
"""

import numpy as np
import pytest
import torch

from accel import build, topk
from pipeline_steps.retrieval import mining
from tests.test_mining import reference_topk as stable_topk  # first k of a stable sort


def own_caps(q):
    return set(range(5 * q, 5 * q + 5))


def own_img(c):
    return {c // 5}


def integer_data(seed, n, d, spread):
    """Small-integer embeddings: float32 dot products are exact and full of ties."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-spread, spread + 1, (n, d)).astype(np.float32)
    cap = rng.integers(-spread, spread + 1, (5 * n, d)).astype(np.float32)
    return img, cap, img.astype(np.float64) @ cap.astype(np.float64).T


def continuous_data(seed, n, d):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, d)).astype(np.float32)
    cap = rng.standard_normal((5 * n, d)).astype(np.float32)
    # Scores as the engines compute them (float32 products), so brute force sees the same values.
    return img, cap, (torch.from_numpy(img) @ torch.from_numpy(cap).T).numpy().astype(np.float64)


def run(img, cap, k_i2t, k_t2i, **kwargs):
    n = img.shape[0]
    out_i = np.full((n, k_i2t), -1, np.int32)
    out_t = np.full((5 * n, k_t2i), -1, np.int32)
    ret = mining.mine_both(img, cap, k_i2t, k_t2i, out_i, out_t, **kwargs)
    assert ret[0] is out_i and ret[1] is out_t
    return out_i, out_t


needs_kernel = pytest.mark.skipif(
    topk.load_kernel() is None, reason="no C compiler: the native kernel cannot be built here"
)


@needs_kernel
@pytest.mark.parametrize(
    "n, d, spread, k_i2t, k_t2i",
    [
        (23, 8, 3, 10, 7),  # many ties
        (40, 4, 1, 150, 39),  # scores in {-4..4}: ties everywhere; k_t2i = every other image
        (31, 6, 2, 150, 1),  # k_i2t = every non-own caption
    ],
)
@pytest.mark.parametrize("block_rows, tile_cols", [(1, 3), (7, 13), (None, 2048)])
def test_native_exact_with_ties(monkeypatch, n, d, spread, k_i2t, k_t2i, block_rows, tile_cols):
    monkeypatch.setattr(mining, "NATIVE_TILE_COLS", tile_cols)
    img, cap, S = integer_data(n + d, n, d, spread)
    k_i2t = min(k_i2t, 5 * (n - 1))
    out_i, out_t = run(img, cap, k_i2t, k_t2i, engine="native", block_rows=block_rows, threads=2)
    np.testing.assert_array_equal(out_i, stable_topk(S, own_caps, k_i2t))
    np.testing.assert_array_equal(out_t, stable_topk(S.T, own_img, k_t2i))


@needs_kernel
def test_native_compactions_on_long_rows(monkeypatch):
    """k much smaller than the rows: queues fill and compact many times (histogram and exact paths)."""
    monkeypatch.setattr(mining, "NATIVE_TILE_COLS", 64)
    img, cap, S = continuous_data(5, 300, 16)
    out_i, out_t = run(img, cap, 9, 4, engine="native", block_rows=64, threads=3)
    np.testing.assert_array_equal(out_i, stable_topk(S, own_caps, 9))
    np.testing.assert_array_equal(out_t, stable_topk(S.T, own_img, 4))
    # All-equal scores: the histogram cannot split them, the exact fallback must.
    img1, cap1 = np.ones((50, 4), np.float32), np.ones((250, 4), np.float32)
    out_i, out_t = run(img1, cap1, 7, 3, engine="native", block_rows=16, threads=2)
    S1 = np.full((50, 250), 4.0)
    np.testing.assert_array_equal(out_i, stable_topk(S1, own_caps, 7))
    np.testing.assert_array_equal(out_t, stable_topk(S1.T, own_img, 3))


@needs_kernel
def test_native_workers_each_hold_k_captions_when_tiles_split_unevenly(monkeypatch):
    """A bug: 1,000 images, 2 threads, k_i2t 2000 (the demo's mining with two threads) split the
    5,000 captions at whole 2048-wide tiles into 4,096 + 904, and the second worker's image lists
    could not fill k: 'a top-k queue holds fewer entries than k'. Scaled down: 10 images, tiles
    of 20 captions, k_i2t 20."""
    monkeypatch.setattr(mining, "NATIVE_TILE_COLS", 20)
    img, cap, S = continuous_data(11, 10, 4)
    out_i, out_t = run(img, cap, 20, 3, engine="native", threads=2)
    np.testing.assert_array_equal(out_i, stable_topk(S, own_caps, 20))
    np.testing.assert_array_equal(out_t, stable_topk(S.T, own_img, 3))
    for n, tile, size in ((5000, 2048, 2005), (50, 20, 25), (10_000, 2048, 2005)):
        ranges = mining.worker_ranges(0, n, 2, tile, size)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and all(b - a >= size for a, b in ranges), ranges
    assert len(mining.worker_ranges(0, 10_000, 2, 2048, 2005)) == 2  # still two workers where both fit


@pytest.mark.parametrize("block_rows", [1, 7, None])
def test_torch_engine_matches_brute_force(block_rows):
    img, cap, S = continuous_data(1, 60, 8)
    out_i, out_t = run(img, cap, 25, 11, engine="torch", block_rows=block_rows)
    np.testing.assert_array_equal(out_i, stable_topk(S, own_caps, 25))
    np.testing.assert_array_equal(out_t, stable_topk(S.T, own_img, 11))


def test_torch_engine_with_ties_selects_equal_scores():
    img, cap, S = integer_data(3, 30, 4, 1)
    out_i, out_t = run(img, cap, 20, 9, engine="torch", block_rows=4)
    for got, want, M in (
        (out_i, stable_topk(S, own_caps, 20), S),
        (out_t, stable_topk(S.T, own_img, 9), S.T),
    ):
        np.testing.assert_array_equal(
            np.take_along_axis(M, got.astype(np.int64), 1), np.take_along_axis(M, want, 1)
        )
    assert all(not own_caps(q) & set(out_i[q]) for q in range(30))
    assert all(c // 5 not in out_t[c] for c in range(150))


@needs_kernel
def test_engines_agree_with_each_other_and_brute_force():
    img, cap, S = continuous_data(7, 80, 32)
    i_ref, t_ref = stable_topk(S, own_caps, 30), stable_topk(S.T, own_img, 12)
    for engine in ("native", "torch", "auto"):
        out_i, out_t = run(img, cap, 30, 12, engine=engine)
        np.testing.assert_array_equal(out_i, i_ref)
        np.testing.assert_array_equal(out_t, t_ref)


def test_progress_and_errors():
    img, cap, _ = continuous_data(2, 20, 4)
    done = []
    run(img, cap, 5, 3, engine="torch", block_rows=6, progress=done.append)
    assert done == [6, 6, 6, 2]
    with pytest.raises(ValueError, match="engine must be"):
        run(img, cap, 5, 3, engine="faiss")
    with pytest.raises(ValueError, match=r"mine_both \(t2i\): k must be"):
        run(img, cap, 5, 20)  # only 19 other images
    with pytest.raises(ValueError, match="block_rows"):
        run(img, cap, 5, 3, block_rows=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="only supported on CUDA"):
            run(img, cap, 5, 3, dtype=torch.float16)


def test_kernel_cache_is_reused_and_atomic(tmp_path):
    first = topk.build_library(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert topk.build_library(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary leftovers


def test_missing_compiler_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("AOQ_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_LOADED", {})  # forget the library this process loaded
    assert topk.load_kernel() is None
    img, cap, S = continuous_data(3, 15, 4)
    out_i, out_t = run(img, cap, 6, 4)  # auto -> torch
    np.testing.assert_array_equal(out_i, stable_topk(S, own_caps, 6))
    with pytest.raises(ValueError, match="could not be built"):
        run(img, cap, 6, 4, engine="native")


@needs_kernel
def test_caption_groups_when_queues_exceed_the_budget(monkeypatch):
    """A budget smaller than the t2i queues: extra passes over caption groups, same result."""
    monkeypatch.setattr(mining, "NATIVE_TILE_COLS", 16)
    img, cap, S = continuous_data(11, 50, 8)
    per_caption = mining.t2i_queue_bytes(1, 6)
    budget = 40 * per_caption  # 40 captions' queues -> groups of 32 captions (whole tiles)
    assert mining.caption_groups(250, 6, 16, budget)[:2] == [(0, 32), (32, 64)]
    out_i, out_t = run(img, cap, 12, 6, engine="native", block_rows=9, max_queue_bytes=budget)
    np.testing.assert_array_equal(out_i, stable_topk(S, own_caps, 12))
    np.testing.assert_array_equal(out_t, stable_topk(S.T, own_img, 6))
