"""The compiled running top-k (mining) and rank counting (evaluation) of topk.c, via ctypes.

Why C: selecting the top 2,000 of 145,000 scores per image with torch.topk costs about as much as
computing the scores (~10 ns per score on one core), and a running selection over tiles needs a
per-element branch that torch cannot express without several passes. The kernel compares each
score with its queue's threshold once; only the few that beat it do more work.

The shared library is built by accel/build.py (system C compiler, -march=native, a cache
folder keyed by source, flags and CPU, atomic writes). `load_kernel()` returns None when no
compiler is available or the accelerated paths are switched off; callers then use torch.
ctypes releases the GIL during each call, so Python threads run disjoint queue ranges in parallel.
"""

import ctypes
from pathlib import Path

import numpy as np

import accel
from accel import build

SOURCE = Path(__file__).with_name("topk.c")

_f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_i32p = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
_i64p = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_i64 = ctypes.c_int64


def build_library(directory=None):
    """Compile the kernel (if not cached) and return the library path; raises RuntimeError."""
    return build.build_library(SOURCE, "aoq_topk", directory)


def _bind(lib):
    lib.aoq_scan_tile.restype = None
    # Raw pointers: scan_tile runs once per tile, and ndpointer's checks would cost more than a
    # small tile's scan; scan_tile checks the tile itself and Queues owns its arrays.
    _ptr = ctypes.c_void_p
    tile = [_ptr] + [_i64] * 6  # tile, n_rows, n_cols, row0, col0, cq0, caps_per_image
    queues = [_ptr] * 4 + [_i64] * 4  # values, ids, fill, threshold, cap, k, lo, hi
    lib.aoq_scan_tile.argtypes = tile + queues + queues  # the rows' (i2t), then the columns' (t2i)
    lib.aoq_finalize.restype = ctypes.c_int
    lib.aoq_finalize.argtypes = [_f32p, _i32p, _i32p, _i64, _i64, _i64, _i64, _i32p, ctypes.c_void_p]
    lib.aoq_merge_sorted.restype = None
    lib.aoq_merge_sorted.argtypes = [_f32p, _i32p, _i64, _i64, _i64, _i64, _i32p]
    lib.aoq_count_ranks.restype = None
    lib.aoq_count_ranks.argtypes = [_f32p, _i64, _i64, _f32p, _i64p, _f32p, _i64p, _i64p, _i32p]
    return lib


def load_kernel():
    """The bound ctypes library, or None: switched off (AOQ_NO_ACCEL), or it cannot be built here
    (logged once)."""
    if not accel.enabled():
        return None
    return build.load_library(SOURCE, "aoq_topk", _bind)


class Queues:
    """`n` running top-k queues of `cap` slots (float32 scores, int32 ids), for the C kernel."""

    def __init__(self, n, k, cap):
        if not 1 <= k <= cap:
            raise ValueError(f"need 1 <= k <= cap, got k={k}, cap={cap}")
        self.k, self.cap = int(k), int(cap)
        self.values = np.empty((n, cap), dtype=np.float32)
        self.ids = np.empty((n, cap), dtype=np.int32)
        self.fill = np.zeros(n, dtype=np.int32)
        self.threshold = np.full(n, -np.inf, dtype=np.float32)

        self.pointers = tuple(a.ctypes.data for a in (self.values, self.ids, self.fill, self.threshold))

    def reset(self):
        self.fill[:] = 0
        self.threshold[:] = -np.inf

    @staticmethod
    def bytes_per_queue(cap):
        return cap * 8 + 8

    def args(self):
        return (*self.pointers, self.cap, self.k)


_NO_QUEUES = (None, None, None, None, 1, -1)  # k = -1: the kernel skips that direction


def scan_tile(lib, tile, row0, col0, caps_per_image, rows, rows_range, cols, cols_range, cols_first=0):
    """Feed one C-contiguous float32 tile to i2t queues `rows` and t2i queues `cols` (either None).

    Tile row r is image row0 + r and feeds rows' queue r; tile column j is caption col0 + j and
    feeds cols' queue col0 - cols_first + j (cols_first: the first caption the queues cover).
    """
    if tile.dtype != np.float32 or not tile.flags.c_contiguous:
        raise ValueError("tile must be a C-contiguous float32 array")
    n_rows, n_cols = tile.shape
    r_args = rows.args() if rows is not None else _NO_QUEUES
    c_args = cols.args() if cols is not None else _NO_QUEUES
    lib.aoq_scan_tile(
        tile.ctypes.data,
        n_rows,
        n_cols,
        row0,
        col0,
        col0 - cols_first,
        caps_per_image,
        *r_args,
        *rows_range,
        *c_args,
        *cols_range,
    )


def finalize(lib, queues, q_lo, q_hi, out, out_scores=None):
    """Sorted top-k ids of queues [q_lo, q_hi) into out (C-contiguous int32, (q_hi - q_lo, k)),
    and their scores into out_scores (float32, same shape) if given."""
    if out_scores is not None:
        if (
            out_scores.dtype != np.float32
            or not out_scores.flags.c_contiguous
            or out_scores.shape != out.shape
        ):
            raise ValueError("out_scores must be C-contiguous float32 of out's shape")
    status = lib.aoq_finalize(
        queues.values,
        queues.ids,
        queues.fill,
        queues.cap,
        queues.k,
        q_lo,
        q_hi,
        out,
        None if out_scores is None else out_scores.ctypes.data,
    )
    if status != 0:
        raise RuntimeError("a top-k queue holds fewer entries than k (internal error)")


def count_ranks(lib, tile, row_thr, row_from, col_thr, col_below, row_counts, col_counts):
    """Tie-aware counts of one tile (the reference's rule: among equal scores the higher index
    ranks first): row_counts[r] += #(tile[r, j] > row_thr[r]), with >= where j >= row_from[r];
    col_counts[j] += #(tile[r, j] > col_thr[j]), with >= where j < col_below[r].

    tile: C-contiguous float32 (R, C); row_thr float32 (R,), row_from int64 (R,); col_thr float32
    (C,); col_below int64 (R,); row_counts int64 (R,), col_counts int32 (C,), updated in place.
    """
    n_rows, n_cols = tile.shape
    lib.aoq_count_ranks(tile, n_rows, n_cols, row_thr, row_from, col_thr, col_below, row_counts, col_counts)


def merge_sorted(lib, scores, ids, r_lo, r_hi, out):
    """Merge per-row sorted lists: scores/ids (R, L, k) C-contiguous (list l's ids all below list
    l + 1's), rows [r_lo, r_hi) -> out (r_hi - r_lo, k) int32, the k best of each row."""
    n_rows, n_lists, k = scores.shape
    if n_lists > 64:
        raise ValueError("at most 64 lists")
    lib.aoq_merge_sorted(scores, ids, n_lists, k, r_lo, r_hi, out)
