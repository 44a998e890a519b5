"""Offline hard-negative candidate mining (AOQ): top-k most similar non-matching items.

Inputs are training-split embeddings: images (N, d) and captions (5N, d), caption c belonging
to image c // 5, as numpy arrays or h5py datasets. Queries are read in row blocks; the other
side (the keys) is loaded whole, since every query block is scored against all of it.
Results are written block by block into a caller-provided int32 array (numpy array or
np.lib.format.open_memmap), so memory stays bounded at COCO scale (113,287 x 566,435 scores).

Scores are dot products (higher = more similar). Each item's positives get score -inf before
torch.topk, so they can never be selected. Order among exactly tied scores is unspecified
(whatever torch.topk returns on the device used).
"""
import numpy as np
import torch

CAPS_PER_IMAGE = 5
DEFAULT_MAX_BLOCK_ELEMS = 2 ** 26  # 256 MiB of float32 scores per block
_REDUCED = (torch.float16, torch.bfloat16)


def _check_inputs(img, cap, k, out, n_queries, n_candidates, what):
    if len(img.shape) != 2 or len(cap.shape) != 2:
        raise ValueError(f"embeddings must be 2-D, got shapes {tuple(img.shape)} and {tuple(cap.shape)}")
    n_img, d = img.shape
    if n_img < 1:
        raise ValueError("no images to mine from")
    if cap.shape[0] != CAPS_PER_IMAGE * n_img:
        raise ValueError(f"expected {CAPS_PER_IMAGE} captions per image: got {cap.shape[0]} captions "
                         f"for {n_img} images")
    if cap.shape[1] != d:
        raise ValueError(f"embedding dims differ: images d={d}, captions d={cap.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= n_candidates:
        raise ValueError(f"{what}: k must be in [1, {n_candidates}] (candidates left after excluding "
                         f"positives), got {k}")
    if tuple(out.shape) != (n_queries, k):
        raise ValueError(f"{what}: out must have shape {(n_queries, int(k))}, got {tuple(out.shape)}")
    if np.dtype(out.dtype) != np.int32:
        raise ValueError(f"{what}: out must be int32, got {out.dtype}")


def _check_device(device, dtype):
    device = torch.device(device)
    if dtype not in (torch.float32,) + _REDUCED:
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    # Reduced-precision matmul on CPU is unsupported or very slow depending on the build;
    # refusing is clearer than silently computing something else than asked.
    if device.type != "cuda" and dtype in _REDUCED:
        raise ValueError(f"dtype {dtype} is only supported on CUDA; use torch.float32 on {device}")
    return device


def _load_rows(source, start, stop, device, dtype):
    """Rows [start, stop) of a numpy array / h5py dataset as a finite tensor on device."""
    rows = np.asarray(source[start:stop])  # h5py reads only this slice
    t = torch.from_numpy(np.ascontiguousarray(rows)).to(torch.float32)
    # Non-finite inputs would make topk return arbitrary (or excluded) indices.
    if not torch.isfinite(t).all():
        raise ValueError(f"non-finite values in embedding rows [{start}, {stop})")
    return t.to(device=device, dtype=dtype)


def _mine(queries, keys, k, out, positives_of, block_rows, device, dtype, max_block_elems, progress):
    """Shared loop: score query blocks against all keys, mask positives, write top-k indices.

    positives_of(q) maps query indices (B,) to a (B, P) tensor of key indices to exclude.
    """
    n_queries, n_keys = queries.shape[0], keys.shape[0]
    rows = max(1, max_block_elems // n_keys)
    if block_rows is not None:
        if int(block_rows) < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        rows = min(rows, int(block_rows))
    with torch.no_grad():
        key_t = _load_rows(keys, 0, n_keys, device, dtype)  # (n_keys, d)
        for a in range(0, n_queries, rows):
            b = min(a + rows, n_queries)
            q = _load_rows(queries, a, b, device, dtype)  # (B, d)
            scores = q @ key_t.T  # (B, n_keys)
            excl = positives_of(torch.arange(a, b, device=device))  # (B, P)
            scores.scatter_(1, excl, float("-inf"))
            top = torch.topk(scores, k, dim=1, largest=True, sorted=True).indices  # (B, k)
            out[a:b] = top.to(device="cpu", dtype=torch.int32).numpy()
            if progress is not None:
                progress(b - a)
    return out


def mine_i2t(img, cap, k, out, block_rows=None, device="cpu", dtype=torch.float32,
             max_block_elems=DEFAULT_MAX_BLOCK_ELEMS, progress=None):
    """For every image, the `k` highest-scoring captions other than its own 5.

    img: (N, d), cap: (5N, d), numpy arrays or h5py datasets (images are read in row blocks,
    captions loaded whole). out: writable int32 array (N, k) (numpy or memmap); row i receives
    caption indices sorted by decreasing score, captions 5i..5i+4 excluded. Returns `out`.

    block_rows caps the images per block; a block also holds at most max_block_elems scores.
    device: 'cpu' or 'cuda'; dtype: scoring precision, torch.float16 / bfloat16 only on CUDA
    (ValueError on CPU). progress: optional callable receiving the number of rows finished by
    each block (an increment, like tqdm's update). Raises ValueError for bad shapes or k
    outside [1, 5N - 5]. Order among exactly tied scores is unspecified.
    """
    n_img = img.shape[0] if len(img.shape) == 2 else 0
    _check_inputs(img, cap, k, out, n_img, CAPS_PER_IMAGE * (n_img - 1), "mine_i2t")
    device = _check_device(device, dtype)
    offsets = torch.arange(CAPS_PER_IMAGE, device=device)

    def own_captions(q):
        return CAPS_PER_IMAGE * q[:, None] + offsets  # (B, 5)

    return _mine(img, cap, int(k), out, own_captions, block_rows, device, dtype, max_block_elems, progress)


def mine_t2i(img, cap, k, out, block_rows=None, device="cpu", dtype=torch.float32,
             max_block_elems=DEFAULT_MAX_BLOCK_ELEMS, progress=None):
    """For every caption, the `k` highest-scoring images other than its own (c // 5).

    img: (N, d), cap: (5N, d), numpy arrays or h5py datasets (captions are read in row blocks,
    images loaded whole). out: writable int32 array (5N, k); row c receives image indices sorted
    by decreasing score, image c // 5 excluded. Returns `out`.

    block_rows, device, dtype, max_block_elems and progress as in mine_i2t. Raises ValueError
    for bad shapes or k outside [1, N - 1]. Order among exactly tied scores is unspecified.
    """
    n_img = img.shape[0] if len(img.shape) == 2 else 0
    _check_inputs(img, cap, k, out, CAPS_PER_IMAGE * n_img, n_img - 1, "mine_t2i")
    device = _check_device(device, dtype)

    def own_image(q):
        return (q // CAPS_PER_IMAGE)[:, None]  # (B, 1)

    return _mine(cap, img, int(k), out, own_image, block_rows, device, dtype, max_block_elems, progress)
