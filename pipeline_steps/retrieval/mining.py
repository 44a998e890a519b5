"""Offline hard-negative candidate mining (AOQ): top-k most similar non-matching items.

Inputs are training-split embeddings: images (N, d) and captions (5N, d), caption c belonging
to image c // 5, as numpy arrays or h5py datasets. Results are written block by block into
caller-provided int32 arrays (numpy arrays or np.lib.format.open_memmap), so memory stays bounded
at COCO scale (113,287 x 566,435 scores).

`mine_both` is what the pipeline runs: i2t and t2i come from the same score matrix, so each tile
of scores is computed once and feeds both selections (rows: the images' top K_i2t captions;
columns: each caption's running top K_t2i images, kept across image blocks). On CPU the selection
is the compiled running-top-k kernel (accel/topk.py); on CUDA, or where no C compiler exists, it is
torch.topk on row blocks plus a running column merge.

Scores are dot products (higher = more similar); positives are never selected. Ties: the native
kernel returns exactly the first k of a stable descending sort (equal scores: lower id first);
the torch paths leave the order among exactly tied scores unspecified.
"""

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from accel import topk
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE

log = logging.getLogger(__name__)
DEFAULT_MAX_BLOCK_ELEMS = 2**26  # 256 MiB of float32 scores per block
_REDUCED = (torch.float16, torch.bfloat16)


def _check_inputs(img, cap, k, out, n_queries, n_candidates, what):
    if len(img.shape) != 2 or len(cap.shape) != 2:
        raise ValueError(f"embeddings must be 2-D, got shapes {tuple(img.shape)} and {tuple(cap.shape)}")
    n_img, d = img.shape
    if n_img < 1:
        raise ValueError("no images to mine from")
    if cap.shape[0] != CAPTIONS_PER_IMAGE * n_img:
        raise ValueError(
            f"expected {CAPTIONS_PER_IMAGE} captions per image: got {cap.shape[0]} captions "
            f"for {n_img} images"
        )
    if cap.shape[1] != d:
        raise ValueError(f"embedding dims differ: images d={d}, captions d={cap.shape[1]}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= n_candidates:
        raise ValueError(
            f"{what}: k must be in [1, {n_candidates}] (candidates left after excluding positives), got {k}"
        )
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


ENGINES = ("auto", "native", "torch")
NATIVE_TILE_COLS = 2048  # captions per tile: a 512 x 2048 float32 tile (4 MiB) stays in cache
NATIVE_BLOCK_ROWS = 512  # images per block (the i2t queues live for one block)
FINAL_ROWS = 65536  # t2i rows finalised and written per step


def queue_capacity(k):
    """Slots per running queue: room for about k more before a compaction (amortised O(1) per
    entry), and at least a whole group of 16 (the kernel's GROUP_MAX)."""
    return 2 * int(k) + 16


def t2i_queue_bytes(n_cap, k_t2i):
    """Memory the native engine holds for the caption queues during the whole pass."""
    return n_cap * topk.Queues.bytes_per_queue(queue_capacity(k_t2i))


def _resolve_engine(engine, device):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if device.type == "cuda":
        if engine == "native":
            raise ValueError("engine 'native' runs on the CPU; use 'torch' (or 'auto') on CUDA")
        return "torch", None
    if engine == "torch":
        return "torch", None
    lib = topk.load_kernel()
    if lib is None:
        if engine == "native":
            raise ValueError(
                "engine 'native' requested but the C kernel could not be built "
                "(see the log); use engine 'torch'"
            )
        return "torch", None
    return "native", lib


def _split(n, parts):
    """`parts` contiguous (lo, hi) ranges covering [0, n) (some may be empty)."""
    edges = np.linspace(0, n, parts + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def available_memory_bytes():
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def caption_groups(n_cap, k_t2i, tile_cols, max_queue_bytes):
    """Caption ranges whose t2i queues each fit in max_queue_bytes (whole tiles per group)."""
    per_caption = t2i_queue_bytes(1, k_t2i)
    size = max(tile_cols, (max_queue_bytes // per_caption) // tile_cols * tile_cols)
    return [(g, min(g + size, n_cap)) for g in range(0, n_cap, size)]


def _run_jobs(pool, fn, arg_lists):
    for job in [pool.submit(fn, *args) for args in arg_lists]:
        job.result()


def worker_ranges(lo, hi, workers, tile_cols, min_size):
    """Split captions [lo, hi) into at most `workers` ranges of whole tiles, each >= min_size
    (a worker's image lists must fill k_i2t from its own range). Whole tiles can make the last
    range short (5,000 captions in 2048-wide tiles: 4,096 + 904), so fewer workers are used then."""
    n_tiles = -(-(hi - lo) // tile_cols)
    for count in range(max(1, min(workers, n_tiles, (hi - lo) // max(1, min_size))), 0, -1):
        edges = [min(hi, lo + round(i * n_tiles / count) * tile_cols) for i in range(count + 1)]
        ranges = [(edges[i], edges[i + 1]) for i in range(count)]
        if count == 1 or all(b - a >= min_size for a, b in ranges):
            return ranges


class _Worker:
    """One CPU thread's share of a pass: a range of caption tiles, scored (single-threaded GEMM)
    and scanned by the same thread, with its own image queues for that range. Workers never touch
    the same queue, so they run side by side without locks and without OpenMP threads spinning
    between the GEMM and the selection."""

    def __init__(self, lib, cap_t, cols, k_i2t, block_rows, tile_cols, caps, group):
        self.lib, self.cap_t, self.cols = lib, cap_t, cols
        self.caps, self.group = caps, group  # t2i queues of the captions [group[0], group[1])
        self.images = _queues(block_rows, k_i2t) if k_i2t else None
        self.tile = torch.empty(block_rows * tile_cols)  # flat: every (n, w) view is contiguous
        self.tile_cols = tile_cols
        if k_i2t:
            self.top_ids = np.empty((block_rows, k_i2t), dtype=np.int32)
            self.top_scores = np.empty((block_rows, k_i2t), dtype=np.float32)

    def block(self, q, a):
        """Score images a.. (rows of q) against this worker's captions, feed both selections."""
        # OpenMP's thread count is per thread: a new thread's GEMM would use every core again.
        torch.set_num_threads(1)
        n = q.shape[0]
        if self.images is not None:
            self.images.reset()
        for c0 in range(self.cols[0], self.cols[1], self.tile_cols):
            c1 = min(c0 + self.tile_cols, self.cols[1])
            # One reused buffer: a fresh 4 MiB tensor per tile would cost page faults.
            out = self.tile[: n * (c1 - c0)].view(n, c1 - c0)
            torch.matmul(q, self.cap_t[c0:c1].T, out=out)
            tile = out.numpy()  # (R, W), C-contiguous float32
            in_group = self.group[0] <= c0 < self.group[1]
            topk.scan_tile(
                self.lib,
                tile,
                a,
                c0,
                CAPTIONS_PER_IMAGE,
                self.images,
                (0, n),
                self.caps if in_group else None,
                (0, c1 - c0),
                self.group[0],
            )
        if self.images is not None:
            topk.finalize(self.lib, self.images, 0, n, self.top_ids[:n], self.top_scores[:n])


def _mine_both_native(
    lib, img, cap_t, k_i2t, k_t2i, out_i2t, out_t2i, block_rows, tile_cols, threads, max_queue_bytes, progress
):
    """The first pass feeds the i2t queues (one image block at a time) and the t2i queues of the
    first caption group; when the t2i queues of all captions do not fit in max_queue_bytes, each
    further group costs one more pass over its columns of the score matrix. Each pass splits its
    captions between `threads` workers; an image's lists from the workers are merged per block."""
    n_img, n_cap = img.shape[0], cap_t.shape[0]
    groups = caption_groups(n_cap, k_t2i, tile_cols, max_queue_bytes)
    if len(groups) > 1:
        log.info(
            "t2i queues for %d captions exceed %.0f MiB: %d caption groups, %d extra passes",
            n_cap,
            max_queue_bytes / 2**20,
            len(groups),
            len(groups) - 1,
        )
    block_rows = min(block_rows, n_img)
    caps = _queues(groups[0][1] - groups[0][0], k_t2i)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker's GEMM runs on its own core
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for g, (g0, g1) in enumerate(groups):
                caps.reset()
                with_i2t = g == 0
                ranges = (
                    worker_ranges(0, n_cap, threads, tile_cols, k_i2t + CAPTIONS_PER_IMAGE)
                    if with_i2t
                    else worker_ranges(g0, g1, threads, tile_cols, 1)
                )
                workers = [
                    _Worker(lib, cap_t, cols, k_i2t if with_i2t else 0, block_rows, tile_cols, caps, (g0, g1))
                    for cols in ranges
                ]
                for a in range(0, n_img, block_rows):
                    b = min(a + block_rows, n_img)
                    q = _load_rows(img, a, b, "cpu", torch.float32)  # (R, d)
                    _run_jobs(pool, _Worker.block, [(w, q, a) for w in workers])
                    if with_i2t:
                        out_i2t[a:b] = _merge_worker_lists(lib, pool, workers, b - a, k_i2t, threads)
                        if progress is not None:
                            progress(b - a)
                for f0 in range(g0, g1, FINAL_ROWS):
                    f1 = min(f0 + FINAL_ROWS, g1)
                    top = np.empty((f1 - f0, k_t2i), dtype=np.int32)
                    _run_jobs(
                        pool,
                        _finalize_rows,
                        [
                            (lib, caps, f0 - g0 + lo, f0 - g0 + hi, top, f0 - g0)
                            for lo, hi in _split(f1 - f0, threads)
                        ],
                    )
                    out_t2i[f0:f1] = top
    finally:
        torch.set_num_threads(torch_threads)


def _merge_worker_lists(lib, pool, workers, n, k, threads):
    if len(workers) == 1:
        return workers[0].top_ids[:n].copy()
    scores = np.ascontiguousarray(np.stack([w.top_scores[:n] for w in workers], axis=1))  # (n, W, k)
    ids = np.ascontiguousarray(np.stack([w.top_ids[:n] for w in workers], axis=1))
    top = np.empty((n, k), dtype=np.int32)
    _run_jobs(
        pool,
        topk.merge_sorted,
        [(lib, scores, ids, lo, hi, top[lo:hi]) for lo, hi in _split(n, threads) if hi > lo],
    )
    return top


def _queues(n, k):
    return topk.Queues(n, k, queue_capacity(k))


def _finalize_rows(lib, queues, q_lo, q_hi, top, offset=0):
    topk.finalize(lib, queues, q_lo, q_hi, top[q_lo - offset : q_hi - offset])


def _mine_both_torch(img, cap_t, k_i2t, k_t2i, out_i2t, out_t2i, rows, device, dtype, progress):
    n_img, n_cap = img.shape[0], cap_t.shape[0]
    offsets = torch.arange(CAPTIONS_PER_IMAGE, device=device)
    best_v = torch.full((k_t2i, n_cap), float("-inf"), device=device, dtype=dtype)
    best_i = torch.zeros((k_t2i, n_cap), device=device, dtype=torch.long)
    for a in range(0, n_img, rows):
        b = min(a + rows, n_img)
        q = _load_rows(img, a, b, device, dtype)
        scores = q @ cap_t.T  # (R, n_cap)
        # An image's own captions are exactly the (image, caption) positives of both directions.
        own = (
            CAPTIONS_PER_IMAGE * torch.arange(b - a, device=device)[:, None]
            + offsets
            + CAPTIONS_PER_IMAGE * a
        )
        scores.scatter_(1, own, float("-inf"))
        top = torch.topk(scores, k_i2t, dim=1, largest=True, sorted=True).indices
        out_i2t[a:b] = top.to(device="cpu", dtype=torch.int32).numpy()
        block_v, block_i = torch.topk(scores, min(k_t2i, b - a), dim=0, largest=True, sorted=False)
        merged_v = torch.cat([best_v, block_v])
        merged_i = torch.cat([best_i, block_i + a])
        best_v, pick = torch.topk(merged_v, k_t2i, dim=0, largest=True, sorted=True)
        best_i = merged_i.gather(0, pick)
        if progress is not None:
            progress(b - a)
    for c0 in range(0, n_cap, FINAL_ROWS):
        c1 = min(c0 + FINAL_ROWS, n_cap)
        out_t2i[c0:c1] = best_i[:, c0:c1].T.to(device="cpu", dtype=torch.int32).numpy()


def mine_both(
    img,
    cap,
    k_i2t,
    k_t2i,
    out_i2t,
    out_t2i,
    device="cpu",
    dtype=torch.float32,
    max_block_elems=DEFAULT_MAX_BLOCK_ELEMS,
    block_rows=None,
    engine="auto",
    threads=None,
    max_queue_bytes=None,
    progress=None,
):
    """i2t and t2i candidates from one pass over the image x caption scores.

    img (N, d), cap (5N, d): numpy arrays or h5py datasets (images read in row blocks, captions
    loaded whole). out_i2t: writable int32 (N, k_i2t); out_t2i: writable int32 (5N, k_t2i); rows
    sorted by decreasing score, positives excluded (an image's own 5 captions; a caption's image).

    engine 'native' (CPU only): tiles of NATIVE_BLOCK_ROWS (or block_rows) images x
    NATIVE_TILE_COLS captions feed the compiled running top-k; memory beyond the embeddings is
    t2i_queue_bytes(5N, k_t2i) (5N x (2 k_t2i + 16) x 8 bytes: 3.7 GB for COCO, k_t2i = 400),
    or max_queue_bytes (default: half the available memory) with extra passes over caption
    groups when that is less. Exact: ties are broken by lower id. engine 'torch' (CPU or CUDA):
    image blocks of at most max_block_elems scores; the t2i running lists take k_t2i x 5N x 12
    bytes on the device.
    'auto': native on CPU when the kernel builds, else torch. threads: CPU threads of the native
    engine (default torch.get_num_threads()). dtype: float32, or float16/bfloat16 on CUDA.
    progress: callable receiving the number of images finished by each block.
    """
    n_img = img.shape[0] if len(img.shape) == 2 else 0
    _check_inputs(img, cap, k_i2t, out_i2t, n_img, CAPTIONS_PER_IMAGE * (n_img - 1), "mine_both (i2t)")
    _check_inputs(img, cap, k_t2i, out_t2i, CAPTIONS_PER_IMAGE * n_img, n_img - 1, "mine_both (t2i)")
    device = _check_device(device, dtype)
    engine, lib = _resolve_engine(engine, device)
    n_cap = CAPTIONS_PER_IMAGE * n_img
    if block_rows is not None and int(block_rows) < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    with torch.no_grad():
        cap_t = _load_rows(cap, 0, n_cap, device, dtype if engine == "torch" else torch.float32)
        if engine == "native":
            rows = int(block_rows) if block_rows is not None else NATIVE_BLOCK_ROWS
            threads = max(1, int(threads or torch.get_num_threads()))
            if max_queue_bytes is None:
                free = available_memory_bytes()
                max_queue_bytes = free // 2 if free else 8 * 2**30
            _mine_both_native(
                lib,
                img,
                cap_t,
                int(k_i2t),
                int(k_t2i),
                out_i2t,
                out_t2i,
                rows,
                NATIVE_TILE_COLS,
                threads,
                int(max_queue_bytes),
                progress,
            )
        else:
            rows = max(1, max_block_elems // n_cap)
            if block_rows is not None:
                rows = min(rows, int(block_rows))
            _mine_both_torch(
                img, cap_t, int(k_i2t), int(k_t2i), out_i2t, out_t2i, rows, device, dtype, progress
            )
    return out_i2t, out_t2i
