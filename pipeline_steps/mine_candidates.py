"""Mine offline hard-negative candidates (AOQ) from training-split embeddings.

Input:  HDF5 embeddings (`images` (N, d), `captions` (5N, d)) of the training split.
Output: `i2t_<ds>.npy` int32 (N, K_i2t): caption ids per image, own 5 captions excluded;
        `t2i_<ds>.npy` int32 (5N, K_t2i): image ids per caption, own image excluded.
        Rows are sorted by decreasing similarity (the authors' layout). Queries are scored a block
        at a time and results written into memory-mapped files, so memory stays bounded.
        Scores are fp32 by default (the reference used fp16 on GPU; its tie order cannot be
        reproduced anyway, spec §4.1).

Example:
    python -m pipeline_steps.mine_candidates --embeddings results/embeddings/vsepp/seed0/train.h5 \
        --out-i2t results/candidates/vsepp/seed0/i2t_demo.npy \
        --out-t2i results/candidates/vsepp/seed0/t2i_demo.npy --k-i2t 2000 --k-t2i 400
"""
import argparse
import logging
import sys

import h5py
import numpy as np
import torch
from tqdm import tqdm

from pipeline_steps.common.atomic import atomic_path
from pipeline_steps.common.checkpoint import pick_device
from pipeline_steps.common.mining import mine_i2t, mine_t2i

log = logging.getLogger("mine_candidates")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--out-i2t", required=True)
    p.add_argument("--out-t2i", required=True)
    p.add_argument("--k-i2t", type=int, default=2000)
    p.add_argument("--k-t2i", type=int, default=400)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="score precision; float16/bfloat16 only on GPU")
    p.add_argument("--block-mb", type=int, default=512, help="memory for one block of scores")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


def mine_to_file(mine, path, rows, k, desc, **kwargs):
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(rows, k))
        with tqdm(total=rows, desc=desc, mininterval=5, file=sys.stderr) as bar:
            mine(out=out, k=k, progress=bar.update, **kwargs)
        out.flush()
        del out


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    max_block_elems = args.block_mb * 2**20 // 4
    with h5py.File(args.embeddings, "r") as h5:
        images, captions = h5["images"], h5["captions"]
        common = dict(img=images, cap=captions, device=device, dtype=DTYPES[args.dtype],
                      max_block_elems=max_block_elems)
        try:
            mine_to_file(mine_i2t, args.out_i2t, images.shape[0], args.k_i2t, "i2t", **common)
            mine_to_file(mine_t2i, args.out_t2i, captions.shape[0], args.k_t2i, "t2i", **common)
        except ValueError as err:
            raise SystemExit(f"error: {args.embeddings}: {err}") from None
        n_img, n_cap = images.shape[0], captions.shape[0]
    log.info("wrote %s (%d x %d) and %s (%d x %d)", args.out_i2t, n_img, args.k_i2t,
             args.out_t2i, n_cap, args.k_t2i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
