"""SCAN precomp folders: validation and memory-mapped access to region features.

A split is `{split}_ims.npy` float32 (rows, 36, D) plus `{split}_caps.txt` (5 captions per image).
Two image-row layouts exist (docs/data.md): one row per image, or one row per caption (Flickr30K
dev). Both are presented as one row per image without copying: image k reads row k * rows_per_image.
"""

import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline_steps.common.errors import InputError
from pipeline_steps.common.npy import open_npy

CAPTIONS_PER_IMAGE = 5
REGIONS = 36
# The reference uses only the first 5,000 dev captions (1,000 images) for validation.
DEV_CAPTION_LIMIT = 5000
# Rows read at a time by the whole-file NaN/Inf pass: about this many bytes (one COCO block: 227 rows).
BLOCK_BYTES = 64 << 20


# Caption lines of SCAN's release per (dataset, split) (Karpathy splits; docs/data.md). A folder
# named like a known dataset is held to them, so a truncated or mixed-up download fails early.
KNOWN_CAPTION_COUNTS = {
    "coco_precomp": {"train": 566_435, "dev": 25_000, "test": 5_000, "testall": 25_000},
    "f30k_precomp": {"train": 145_000, "dev": 5_070, "test": 5_000},
}


class DataError(InputError):
    """A dataset file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class SplitInfo:
    split: str
    n_images: int  # images used (after the dev limit)
    n_captions: int  # captions used = 5 * n_images
    rows_per_image: int  # 1 (one row per image) or 5 (one row per caption)
    img_dim: int

    def as_dict(self):
        return dict(self.__dict__)


def count_lines(path):
    with open(path, "rb") as handle:
        return sum(1 for _ in handle)


def release_mapped_pages(array):
    """Tell the kernel this process no longer needs the pages of `array`'s file mapping.

    MADV_DONTNEED takes them out of the process's resident set; they stay in the page cache, so a
    later read is not a disk read. A no-op for arrays that are not memory-mapped (or no madvise).
    """
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def open_features(path):
    """Open `{split}_ims.npy` memory-mapped (never read whole); errors name the file."""
    try:
        return open_npy(path)
    except InputError as err:
        raise DataError(str(err)) from None


def validate_split(folder, split, img_dim, dev_limit=True, check_duplicates=8, dataset=None, block_rows=None):
    """Check one split and return its SplitInfo; raise DataError naming the file on problems.

    `dataset` (e.g. "coco_precomp") additionally checks the caption count of a known release.
    Every feature value is checked to be finite, reading `block_rows` rows at a time (default:
    about 64 MiB); see `_check_finite`.
    """
    folder = Path(folder)
    ims_path, caps_path = folder / f"{split}_ims.npy", folder / f"{split}_caps.txt"
    if not caps_path.exists():
        raise DataError(f"{caps_path}: file is missing")
    features = open_features(ims_path)
    if features.ndim != 3 or features.shape[1] != REGIONS:
        raise DataError(f"{ims_path}: expected shape (rows, {REGIONS}, D), found {features.shape}")
    if features.dtype != np.float32:
        raise DataError(f"{ims_path}: expected float32 features, found {features.dtype}")
    if features.shape[2] != img_dim:
        raise DataError(f"{ims_path}: feature width is {features.shape[2]}, config says img_dim={img_dim}")
    n_caps = count_lines(caps_path)
    if n_caps == 0 or n_caps % CAPTIONS_PER_IMAGE:
        raise DataError(
            f"{caps_path}: {n_caps} caption lines, expected a positive multiple of "
            f"{CAPTIONS_PER_IMAGE} (5 consecutive captions per image)"
        )
    expected = KNOWN_CAPTION_COUNTS.get(dataset, {}).get(split)
    if expected is not None and n_caps != expected:
        raise DataError(
            f"{caps_path}: {n_caps} captions, but {dataset} {split} has {expected} "
            "in SCAN's release (truncated or mixed-up files?)"
        )
    rows = features.shape[0]
    if rows == n_caps:
        rows_per_image = CAPTIONS_PER_IMAGE
    elif rows * CAPTIONS_PER_IMAGE == n_caps:
        rows_per_image = 1
    else:
        raise DataError(
            f"{ims_path}: {rows} image rows do not match {n_caps} captions in "
            f"{caps_path.name} (expected {n_caps // CAPTIONS_PER_IMAGE} or {n_caps} rows)"
        )
    # Before the repeated-rows check: NaN != NaN, so a NaN there would read as "rows differ".
    _check_finite(features, ims_path, rows_per_image, block_rows)
    if rows_per_image == CAPTIONS_PER_IMAGE:
        _check_repeated_rows(features, ims_path, check_duplicates)
    if split == "dev" and dev_limit:
        n_caps = min(n_caps, DEV_CAPTION_LIMIT)
    return SplitInfo(split, n_caps // CAPTIONS_PER_IMAGE, n_caps, rows_per_image, img_dim)


def _check_finite(features, path, rows_per_image, block_rows=None):
    """Raise DataError naming the first image (and row) that holds NaN or Inf.

    Such a value passes every shape check and only surfaces later as a NaN loss or a crash that
    names neither the file nor the image. The whole file is read (COCO train: 33 GB) in blocks of
    about 64 MiB, and each block's pages are dropped from this process's resident set after it
    is checked, so the pass needs one block of memory however large the split is.
    """
    row_bytes = features.itemsize * int(np.prod(features.shape[1:]))
    block_rows = block_rows or max(1, BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, features.shape[0], block_rows):
        block = np.asarray(features[start : start + block_rows])
        if not np.isfinite(block).all():  # the common case costs one reduction per block
            _raise_first_non_finite(block, start, path, rows_per_image)
        release_mapped_pages(features)


def _raise_first_non_finite(block, start, path, rows_per_image):
    """The block holds a non-finite value: find the first bad row and the first bad value in it."""
    values = block.reshape(len(block), -1)
    row = int(np.argmin(np.isfinite(values).all(axis=1)))
    value = values[row][np.argmin(np.isfinite(values[row]))]
    problem = "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    row += start
    raise DataError(f"{path}: image {row // rows_per_image} (row {row}) holds {problem}")


def _check_repeated_rows(features, path, samples):
    """In the one-row-per-caption layout, the 5 rows of an image must be identical."""
    n_images = features.shape[0] // CAPTIONS_PER_IMAGE
    for k in np.linspace(0, n_images - 1, num=min(samples, n_images)).astype(int):
        block = np.asarray(features[k * CAPTIONS_PER_IMAGE : (k + 1) * CAPTIONS_PER_IMAGE])
        if not (block == block[0]).all():
            raise DataError(f"{path}: one row per caption, but the 5 rows of image {k} differ")


class ImageFeatures:
    """One row per image over a memory-mapped split, whatever its row layout.

    Pages a read touched stay mapped into the process (and count in its RSS) until the kernel
    reclaims them; over an epoch of COCO's 33 GB that looks like the whole file. Every
    `release_every_bytes` read, the mapping is told the pages are not needed (MADV_DONTNEED): they
    stay in the page cache for the next read, but leave this process's resident set.
    """

    def __init__(self, folder, info, release_every_bytes=1 << 30):
        self.path = Path(folder) / f"{info.split}_ims.npy"
        self.rows_per_image = info.rows_per_image
        self.n_images = info.n_images
        self.release_every_bytes = release_every_bytes
        self._read_since_release = 0
        self._array = None  # opened lazily, so DataLoader workers each map the file themselves

    @property
    def array(self):
        if self._array is None:
            self._array = open_features(self.path)
        return self._array

    def __len__(self):
        return self.n_images

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def rows(self, image_ids):
        """Features of the given images as one float32 array (len, 36, D); reads only those rows."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        order = np.argsort(image_ids, kind="stable")  # sorted reads are kinder to the page cache
        out = np.empty((len(image_ids),) + self.array.shape[1:], dtype=np.float32)
        out[order] = self.array[image_ids[order] * self.rows_per_image]
        self._read_since_release += out.nbytes
        if self._read_since_release >= self.release_every_bytes:
            self.release_pages()
        return out

    def release_pages(self):
        """Drop this process's mapping of the pages read so far (they stay in the page cache)."""
        self._read_since_release = 0
        release_mapped_pages(self._array)
