"""Adopt the authors' offline candidate files (i2t_<ds>.npy, t2i_<ds>.npy) instead of mining.

Inputs:  the two .npy files and the prepared folder (for the training split's size).
Checks:  pipeline_steps/data/candidates.py (the check training makes too): 2-D int32, one row
         per training image (i2t) or caption (t2i), enough columns for `--offline-size` (t2i
         needs ceil(n/5)), every index of those columns in range, no row listing its own
         positives.
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

from pipeline_steps.common.atomic import remove_stale_temporaries, temporary_path
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.data.candidates import checked_candidates
from pipeline_steps.data.splits import read_manifest


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--i2t", required=True)
    p.add_argument("--t2i", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--offline-size", type=int, default=300)
    p.add_argument("--out-i2t", required=True)
    p.add_argument("--out-t2i", required=True)
    return p.parse_args(argv)


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
    n_img = train["n_images"]
    checked_candidates(args.i2t, "i2t", n_img, args.offline_size)
    checked_candidates(args.t2i, "t2i", n_img, args.offline_size)
    link(args.out_i2t, args.i2t)
    link(args.out_t2i, args.t2i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
