"""Mine offline hard-negative candidates (AOQ) from training-split embeddings.

Input:  HDF5 embeddings (`images` (N, d), `captions` (5N, d)) of the training split.
Output: `i2t_<ds>.npy` int32 (N, K_i2t): caption ids per image, own 5 captions excluded;
        `t2i_<ds>.npy` int32 (5N, K_t2i): image ids per caption, own image excluded.
        Rows are sorted by decreasing similarity (the authors' layout). Both directions come from
        one pass over the score matrix (each tile of scores feeds both selections; see
        pipeline_steps/retrieval/mining.py), results are written into memory-mapped files, so
        memory stays bounded. Scores are fp32 by default (the reference used fp16 on GPU; its
        tie order cannot be reproduced anyway; docs/reference_behaviours.md); on CPU, equal
        scores are ordered by lower id.

Example:
    python -m pipeline_steps.mine_candidates --embeddings results/embeddings/vsepp/seed0/train.h5 \
        --out-i2t results/candidates/vsepp/seed0/i2t_demo.npy \
        --out-t2i results/candidates/vsepp/seed0/t2i_demo.npy --k-i2t 2000 --k-t2i 400
"""

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

import accel
from pipeline_steps.common.atomic import atomic_path, remove_stale_temporaries
from pipeline_steps.common.device import pick_device, set_tf32
from pipeline_steps.common.errors import InputError, one_line_errors
from pipeline_steps.retrieval.audit import load_caption_groups
from pipeline_steps.retrieval.exclusion import duplicate_counts, write_filtered
from pipeline_steps.retrieval.mining import ENGINES, mine_both, t2i_queue_bytes

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
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="score precision; float16/bfloat16 only on GPU",
    )
    p.add_argument("--block-mb", type=int, default=256, help="memory for one block of scores")
    p.add_argument(
        "--exclude-duplicates",
        metavar="TRAIN_IDS_NPZ",
        help="drop candidates whose caption is identical to a positive's (the prepared caption ids)",
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="selection engine: native (compiled, CPU), torch (CPU or GPU), auto",
    )
    return p.parse_args(argv)


def mine(args, images, captions, out_i2t, out_t2i, device):
    try:
        with tqdm(total=len(images), desc="mining", unit="img", mininterval=5, file=sys.stderr) as bar:
            mine_both(
                images,
                captions,
                out_i2t.shape[1],
                out_t2i.shape[1],
                out_i2t,
                out_t2i,
                device=device,
                dtype=DTYPES[args.dtype],
                max_block_elems=args.block_mb * 2**20 // 4,
                engine=args.engine,
                progress=bar.update,
            )
    except ValueError as err:
        raise InputError(f"{args.embeddings}: {err}") from None


def mine_without_duplicates(args, images, captions, out_i2t, out_t2i, device):
    """Mine as many extra columns as the most duplicated anchor has duplicates, then drop them
    (docs/mining_audit.md): each row is exactly the top k of the candidates that remain."""
    groups = load_caption_groups(args.exclude_duplicates, len(captions))
    per_image, per_caption = duplicate_counts(groups)
    shapes = []
    for out, flagged, available, what in (
        (out_i2t, per_image, len(captions) - 5, "i2t"),
        (out_t2i, per_caption, len(images) - 1, "t2i"),
    ):
        k = out.shape[1]
        if available - flagged.max() < k:
            raise InputError(
                f"{args.embeddings}: {what}: k={k}, but an anchor has only {available - flagged.max()} "
                "candidates left once duplicate captions are excluded"
            )
        shapes.append((len(out), min(available, k + int(flagged.max()))))
    log.info("excluding duplicate captions: mining %d i2t and %d t2i columns", shapes[0][1], shapes[1][1])
    with tempfile.TemporaryDirectory(dir=Path(args.out_i2t).parent) as scratch:
        wide = [
            np.lib.format.open_memmap(Path(scratch) / f"{name}.npy", mode="w+", dtype=np.int32, shape=shape)
            for name, shape in zip(("i2t", "t2i"), shapes)
        ]
        mine(args, images, captions, *wide, device)
        write_filtered(wide[0], out_i2t, groups, "i2t")
        write_filtered(wide[1], out_t2i, groups, "t2i")
        del wide


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    remove_stale_temporaries(args.out_i2t, args.out_t2i)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    set_tf32(False)  # full fp32, as the reference
    log.info("accelerated paths: %s", accel.summary())
    with h5py.File(args.embeddings, "r") as h5:
        images, captions = h5["images"], h5["captions"]
        n_img, n_cap = images.shape[0], captions.shape[0]
        log.info(
            "mining %d images x %d captions on %s (t2i lists: %.0f MiB on CPU)",
            n_img,
            n_cap,
            device,
            t2i_queue_bytes(n_cap, args.k_t2i) / 2**20,
        )
        with atomic_path(args.out_i2t) as tmp_i2t, atomic_path(args.out_t2i) as tmp_t2i:
            out_i2t = np.lib.format.open_memmap(tmp_i2t, mode="w+", dtype=np.int32, shape=(n_img, args.k_i2t))
            out_t2i = np.lib.format.open_memmap(tmp_t2i, mode="w+", dtype=np.int32, shape=(n_cap, args.k_t2i))
            if args.exclude_duplicates:
                mine_without_duplicates(args, images, captions, out_i2t, out_t2i, device)
            else:
                mine(args, images, captions, out_i2t, out_t2i, device)
            out_i2t.flush()
            out_t2i.flush()
            del out_i2t, out_t2i
    log.info(
        "wrote %s (%d x %d) and %s (%d x %d)",
        args.out_i2t,
        n_img,
        args.k_i2t,
        args.out_t2i,
        n_cap,
        args.k_t2i,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
