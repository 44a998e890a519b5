"""Tests for pipeline_steps.retrieval.mining against a brute-force full-sort reference."""
import h5py
import numpy as np
import pytest
import torch

from pipeline_steps.retrieval import mining

N, D = 23, 8


def exact_gaussian(rng, n, d):
    """Gaussian-like embeddings on a 2**-10 grid, |x| <= 1, d <= 8: float32 dot products are exact."""
    return np.clip(np.round(rng.standard_normal((n, d)) * 300), -1024, 1024) / 1024.0


def reference_topk(S, excluded, k):
    """First k indices of a full descending sort of each row of S, excluded entries removed."""
    rows = []
    for q in range(S.shape[0]):
        order = np.argsort(-S[q], kind="stable")
        rows.append([j for j in order if j not in excluded(q)][:k])
    return np.array(rows, dtype=np.int64)


def ties_in_topk(S, excluded, k):
    """True if two of the k+1 best allowed scores of a row are equal (top-k order ambiguous)."""
    for q in range(S.shape[0]):
        allowed = np.sort(np.delete(S[q], list(excluded(q))))[::-1][:k + 1]
        if np.any(allowed[:-1] == allowed[1:]):
            return True
    return False


def own_caps(q):
    return set(range(5 * q, 5 * q + 5))


def own_img(c):
    return {c // 5}


def make_data(seed, k):
    """float32 embeddings (N, D) / (5N, D), redrawn until the top-(k+1) lists hold no ties."""
    rng = np.random.default_rng(seed)
    while True:
        img = exact_gaussian(rng, N, D).astype(np.float32)
        cap = exact_gaussian(rng, 5 * N, D).astype(np.float32)
        S = img.astype(np.float64) @ cap.astype(np.float64).T  # (N, 5N)
        if not ties_in_topk(S, own_caps, k) and not ties_in_topk(S.T, own_img, min(k, N - 1)):
            return img, cap, S


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_rows", [1, 4, 7, None])
def test_i2t_matches_brute_force(seed, block_rows):
    k = 10
    img, cap, S = make_data(seed, k)
    out = np.full((N, k), -1, dtype=np.int32)
    ret = mining.mine_i2t(img, cap, k, out, block_rows=block_rows)
    assert ret is out and out.dtype == np.int32
    np.testing.assert_array_equal(out, reference_topk(S, own_caps, k))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_rows", [1, 6, 13, None])
def test_t2i_matches_brute_force(seed, block_rows):
    k = 5
    img, cap, S = make_data(seed, k)
    out = np.full((5 * N, k), -1, dtype=np.int32)
    mining.mine_t2i(img, cap, k, out, block_rows=block_rows)
    np.testing.assert_array_equal(out, reference_topk(S.T, own_img, k))


def test_max_block_elems_and_progress():
    k = 4
    img, cap, S = make_data(2, k)
    done = []
    out = np.zeros((N, k), dtype=np.int32)
    # 5N = 115 captions per image row -> at most 2 images per block of <= 250 scores.
    mining.mine_i2t(img, cap, k, out, max_block_elems=250, progress=done.append)
    assert max(done) <= 2 and sum(done) == N
    np.testing.assert_array_equal(out, reference_topk(S, own_caps, k))
    done.clear()
    out_t = np.zeros((5 * N, k), dtype=np.int32)
    mining.mine_t2i(img, cap, k, out_t, block_rows=50, progress=done.append)
    assert sum(done) == 5 * N
    np.testing.assert_array_equal(out_t, reference_topk(S.T, own_img, k))


def test_memmap_output_and_invariants(tmp_path):
    k = 12
    img, cap, S = make_data(3, k)
    path = tmp_path / "i2t.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(N, k))
    mining.mine_i2t(img, cap, k, out, block_rows=5)
    out.flush()
    del out
    got = np.load(path)
    assert got.dtype == np.int32 and got.shape == (N, k)
    np.testing.assert_array_equal(got, reference_topk(S, own_caps, k))
    for q in range(N):
        assert not own_caps(q) & set(got[q].tolist())
        assert np.all(np.diff(S[q, got[q]]) < 0)  # strictly decreasing scores
    out_t = np.lib.format.open_memmap(tmp_path / "t2i.npy", mode="w+", dtype=np.int32,
                                      shape=(5 * N, N - 1))
    mining.mine_t2i(img, cap, N - 1, out_t, block_rows=9)  # k = every allowed image
    for c in range(5 * N):
        assert sorted(out_t[c].tolist()) == sorted(set(range(N)) - own_img(c))
        assert np.all(np.diff(S[out_t[c], c]) <= 0)


def test_h5py_inputs(tmp_path):
    k = 6
    img, cap, S = make_data(4, k)
    path = tmp_path / "emb.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=img)
        f.create_dataset("captions", data=cap)
    with h5py.File(path, "r") as f:
        out_i = mining.mine_i2t(f["images"], f["captions"], k, np.zeros((N, k), np.int32), block_rows=4)
        out_t = mining.mine_t2i(f["images"], f["captions"], k, np.zeros((5 * N, k), np.int32),
                                block_rows=17)
    np.testing.assert_array_equal(out_i, reference_topk(S, own_caps, k))
    np.testing.assert_array_equal(out_t, reference_topk(S.T, own_img, k))


def test_errors():
    rng = np.random.default_rng(0)
    img, cap = rng.standard_normal((6, 4)), rng.standard_normal((30, 4))
    ok_i, ok_t = np.zeros((6, 3), np.int32), np.zeros((30, 3), np.int32)
    with pytest.raises(ValueError, match="k must be"):
        mining.mine_i2t(img, cap, 0, np.zeros((6, 0), np.int32))
    with pytest.raises(ValueError, match="k must be"):
        mining.mine_i2t(img, cap, 26, np.zeros((6, 26), np.int32))  # only 25 non-own captions
    with pytest.raises(ValueError, match="k must be"):
        mining.mine_t2i(img, cap, 6, np.zeros((30, 6), np.int32))  # only 5 other images
    with pytest.raises(ValueError, match="captions per image"):
        mining.mine_i2t(img, cap[:29], 3, ok_i)
    with pytest.raises(ValueError, match="dims"):
        mining.mine_t2i(img, rng.standard_normal((30, 5)), 3, ok_t)
    with pytest.raises(ValueError, match="out must have shape"):
        mining.mine_i2t(img, cap, 3, ok_t)
    with pytest.raises(ValueError, match="int32"):
        mining.mine_i2t(img, cap, 3, np.zeros((6, 3), np.int64))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="only supported on CUDA"):
            mining.mine_i2t(img, cap, 3, ok_i, dtype=torch.float16)
    # The largest allowed k works: every other image for t2i.
    out = mining.mine_t2i(img, cap, 5, np.zeros((30, 5), np.int32))
    assert all(c // 5 not in out[c] for c in range(30))
