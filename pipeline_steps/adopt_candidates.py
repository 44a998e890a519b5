"""Adopt the authors' offline candidate files (i2t_<ds>.npy, t2i_<ds>.npy) instead of mining.

Inputs:  the two .npy files and the prepared folder (for the training split's size).
Checks:  2-D int32; i2t has one row per training image and t2i one row per training caption;
         every index in range; no row lists its own positives (i2t: the image's 5 captions,
         t2i: the caption's image); enough columns for `--offline-size` (t2i needs ceil(n/5)).
         Files are read memory-mapped a block of rows at a time.
Outputs: `--out-i2t` / `--out-t2i` as symbolic links to the checked files (no 2 x 900 MB copy at
         COCO scale), the names the AOQ training rules read.

Example:
    python -m pipeline_steps.adopt_candidates --i2t offcandi/i2t_coco.npy --t2i offcandi/t2i_coco.npy \
        --prepared results/coco_precomp/prepared --offline-size 300 \
        --out-i2t results/coco_precomp/candidates/authors/i2t_coco.npy \
        --out-t2i results/coco_precomp/candidates/authors/t2i_coco.npy
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from pipeline_steps.common.atomic import remove_stale_temporaries, temporary_path
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE
from pipeline_steps.data.splits import read_manifest

BLOCK_ROWS = 65536


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--i2t", required=True)
    p.add_argument("--t2i", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--offline-size", type=int, default=300)
    p.add_argument("--out-i2t", required=True)
    p.add_argument("--out-t2i", required=True)
    return p.parse_args(argv)


def check_candidates(path, rows, n_targets, min_cols, is_own):
    """Raise ValueError naming `path` unless it is a valid candidate file (see module doc)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None
    if array.ndim != 2 or array.dtype != np.int32:
        raise ValueError(f"{path}: expected a 2-D int32 array, found {array.dtype} {array.shape}")
    if array.shape[0] != rows or array.shape[1] < min_cols:
        raise ValueError(
            f"{path}: expected shape ({rows}, >= {min_cols}) for this training split, found {array.shape}"
        )
    for start in range(0, rows, BLOCK_ROWS):
        block = np.asarray(array[start : start + BLOCK_ROWS])
        if block.min() < 0 or block.max() >= n_targets:
            raise ValueError(
                f"{path}: indices must lie in [0, {n_targets}); rows {start}.. hold "
                f"{block.min()}..{block.max()}"
            )
        hits = np.argwhere(is_own(np.arange(start, start + len(block))[:, None], block))
        if len(hits):
            row, col = hits[0]
            raise ValueError(f"{path}: row {start + row} lists its own positive ({block[row, col]})")


def caption_of_image(image_rows, captions):
    """i2t: a caption is the row image's own when caption // 5 is that image."""
    return captions // CAPTIONS_PER_IMAGE == image_rows


def image_of_caption(caption_rows, images):
    """t2i: an image is the row caption's own when it is caption // 5."""
    return images == caption_rows // CAPTIONS_PER_IMAGE


def link(target, source):
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(source).resolve())
    os.replace(tmp, target)


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    remove_stale_temporaries(args.out_i2t, args.out_t2i)
    train = read_manifest(args.prepared)["splits"]["train"]
    n_img, n_cap = train["n_images"], train["n_captions"]
    try:
        check_candidates(args.i2t, n_img, n_cap, args.offline_size, caption_of_image)
        check_candidates(
            args.t2i, n_cap, n_img, -(-args.offline_size // CAPTIONS_PER_IMAGE), image_of_caption
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    link(args.out_i2t, args.i2t)
    link(args.out_t2i, args.t2i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
