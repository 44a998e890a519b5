"""mining.mine_both (both engines) against a brute-force full-sort reference, on tie-free data."""

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
        allowed = np.sort(np.delete(S[q], list(excluded(q))))[::-1][: k + 1]
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


def mine(img, cap, k_i2t, k_t2i, **kwargs):
    """mining.mine_both with fresh outputs (the torch engine unless told otherwise)."""
    n = img.shape[0]
    out_i, out_t = np.full((n, k_i2t), -1, np.int32), np.full((5 * n, k_t2i), -1, np.int32)
    return mining.mine_both(img, cap, k_i2t, k_t2i, out_i, out_t, **{"engine": "torch", **kwargs})


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_rows", [1, 4, 7, None])
@pytest.mark.parametrize("engine", ["torch", "auto"])
def test_both_directions_match_brute_force(seed, block_rows, engine):
    img, cap, S = make_data(seed, 10)
    out_i, out_t = mine(img, cap, 10, 5, block_rows=block_rows, engine=engine)
    assert out_i.dtype == out_t.dtype == np.int32
    np.testing.assert_array_equal(out_i, reference_topk(S, own_caps, 10))
    np.testing.assert_array_equal(out_t, reference_topk(S.T, own_img, 5))


def test_max_block_elems_and_progress():
    k = 4
    img, cap, S = make_data(2, k)
    done = []
    # 5N = 115 captions per image row -> at most 2 images per block of <= 250 scores.
    out_i, out_t = mine(img, cap, k, k, max_block_elems=250, progress=done.append)
    assert max(done) <= 2 and sum(done) == N
    np.testing.assert_array_equal(out_i, reference_topk(S, own_caps, k))
    np.testing.assert_array_equal(out_t, reference_topk(S.T, own_img, k))


@pytest.mark.parametrize("engine", ["torch", "auto"])
def test_memmap_output_and_invariants(tmp_path, engine):
    k = 12
    img, cap, S = make_data(3, k)
    out_i = np.lib.format.open_memmap(tmp_path / "i2t.npy", mode="w+", dtype=np.int32, shape=(N, k))
    out_t = np.lib.format.open_memmap(tmp_path / "t2i.npy", mode="w+", dtype=np.int32, shape=(5 * N, N - 1))
    mining.mine_both(img, cap, k, N - 1, out_i, out_t, block_rows=5, engine=engine)  # t2i: every image
    out_i.flush()
    out_t.flush()
    del out_i, out_t
    got = np.load(tmp_path / "i2t.npy")
    assert got.dtype == np.int32 and got.shape == (N, k)
    np.testing.assert_array_equal(got, reference_topk(S, own_caps, k))
    for q in range(N):
        assert not own_caps(q) & set(got[q].tolist())
        assert np.all(np.diff(S[q, got[q]]) < 0)  # strictly decreasing scores
    got_t = np.load(tmp_path / "t2i.npy")
    for c in range(5 * N):
        assert sorted(got_t[c].tolist()) == sorted(set(range(N)) - own_img(c))
        assert np.all(np.diff(S[got_t[c], c]) <= 0)


@pytest.mark.parametrize("engine", ["torch", "auto"])
def test_h5py_inputs(tmp_path, engine):
    k = 6
    img, cap, S = make_data(4, k)
    path = tmp_path / "emb.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=img)
        f.create_dataset("captions", data=cap)
    with h5py.File(path, "r") as f:
        out_i, out_t = mine(f["images"], f["captions"], k, k, block_rows=4, engine=engine)
    np.testing.assert_array_equal(out_i, reference_topk(S, own_caps, k))
    np.testing.assert_array_equal(out_t, reference_topk(S.T, own_img, k))


def test_errors():
    rng = np.random.default_rng(0)
    img, cap = rng.standard_normal((6, 4)), rng.standard_normal((30, 4))
    ok_i, ok_t = np.zeros((6, 3), np.int32), np.zeros((30, 3), np.int32)

    def both(img_, cap_, k_i2t, k_t2i, out_i, out_t, **kwargs):
        return mining.mine_both(img_, cap_, k_i2t, k_t2i, out_i, out_t, **kwargs)

    with pytest.raises(ValueError, match="k must be"):
        both(img, cap, 0, 3, np.zeros((6, 0), np.int32), ok_t)
    with pytest.raises(ValueError, match="k must be"):
        both(img, cap, 26, 3, np.zeros((6, 26), np.int32), ok_t)  # only 25 non-own captions
    with pytest.raises(ValueError, match="k must be"):
        both(img, cap, 3, 6, ok_i, np.zeros((30, 6), np.int32))  # only 5 other images
    with pytest.raises(ValueError, match="captions per image"):
        both(img, cap[:29], 3, 3, ok_i, ok_t)
    with pytest.raises(ValueError, match="dims"):
        both(img, rng.standard_normal((30, 5)), 3, 3, ok_i, ok_t)
    with pytest.raises(ValueError, match="out must have shape"):
        both(img, cap, 3, 3, ok_t, ok_t)
    with pytest.raises(ValueError, match="int32"):
        both(img, cap, 3, 3, np.zeros((6, 3), np.int64), ok_t)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="only supported on CUDA"):
            both(img, cap, 3, 3, ok_i, ok_t, dtype=torch.float16)
    # The largest allowed k works: every other image for t2i.
    _, out = mine(img, cap, 3, 5)
    assert all(c // 5 not in out[c] for c in range(30))
