"""Audit a set of offline candidates: how hard they are against the online hardest negative of
random training batches, how many duplicate a positive's caption, how many score above the
anchor's own positive, on the demo data how much of each scene's near-duplicate family they
find, and (optionally) how much they overlap another set (docs/mining_audit.md).

Inputs:  the miner's training-split embeddings (HDF5 `images` (N, d), `captions` (5N, d)), the
         i2t / t2i candidate files, the prepared training caption ids (`train_ids.npz`) and,
         for demo data, demo_meta.json (scene families).
Outputs: `audit.json` (every number) and `audit.png` (the hardness figure).

Example:
    python -m pipeline_steps.audit_mining --embeddings results/x/embeddings/vsrn/seed0/train.h5 \
        --i2t results/x/candidates/vsrn/seed0/i2t_x.npy --t2i results/x/candidates/vsrn/seed0/t2i_x.npy \
        --caption-ids results/x/prepared/train_ids.npz --batch-size 128 --offline-size 300 \
        --out-json audit.json --out-png audit.png
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline_steps.common.atomic import remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.errors import InputError, one_line_errors
from pipeline_steps.common.npy import open_npy
from pipeline_steps.reporting.audit_figure import plot_audit
from pipeline_steps.retrieval import audit

log = logging.getLogger("audit_mining")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embeddings", required=True)
    p.add_argument("--i2t", required=True)
    p.add_argument("--t2i", required=True)
    p.add_argument("--caption-ids", required=True, help="the prepared train_ids.npz")
    p.add_argument("--demo-meta", help="demo_meta.json of generated data: scene families")
    p.add_argument("--batch-size", type=int, default=128, help="of the online batches compared with")
    p.add_argument("--seed", type=int, default=0, help="the batches are this seed's first training epoch")
    p.add_argument("--offline-size", type=int, default=300, help="AOQ draws from this top of each row")
    p.add_argument("--compare-i2t", help="another candidate set, for overlap@K")
    p.add_argument("--compare-t2i")
    p.add_argument("--compare-label", default="other")
    p.add_argument("--block-mb", type=int, default=16, help="memory for one block of gathered embeddings")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-png", required=True)
    return p.parse_args(argv)


def load_embeddings(path):
    try:
        with h5py.File(path, "r") as h5:
            images = np.asarray(h5["images"], dtype=np.float32)
            captions = np.asarray(h5["captions"], dtype=np.float32)
    except (OSError, KeyError) as err:
        raise InputError(f"{path}: not an embeddings file with images and captions ({err})") from None
    if len(captions) != audit.CAPTIONS_PER_IMAGE * len(images):
        raise InputError(
            f"{path}: {len(captions)} captions for {len(images)} images "
            f"(expected {audit.CAPTIONS_PER_IMAGE} each)"
        )
    return images, captions


def load_candidates(path, rows, targets, what):
    array = open_npy(path)
    if array.ndim != 2 or array.shape[0] != rows:
        raise InputError(f"{path}: expected {rows} rows (one per training {what}), found shape {array.shape}")
    low, high = int(array.min()), int(array.max())  # one read of the file
    if low < 0 or high >= targets:
        raise InputError(f"{path}: ids must lie in [0, {targets}), found {low}..{high}")
    return array


def load_families(path, n_img):
    if not path:
        return None
    family = np.asarray(json.loads(Path(path).read_text(encoding="utf-8"))["splits"]["train"]["family"])
    if len(family) != n_img:
        raise InputError(f"{path}: splits.train.family has {len(family)} entries for {n_img} images")
    return family


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    remove_stale_temporaries(args.out_json, args.out_png)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    images, captions = load_embeddings(args.embeddings)
    n_img, n_cap = len(images), len(captions)
    i2t = load_candidates(args.i2t, n_img, n_cap, "image")
    t2i = load_candidates(args.t2i, n_cap, n_img, "caption")
    groups = audit.load_caption_groups(args.caption_ids, n_cap)
    family = load_families(args.demo_meta, n_img)
    hardest_i2t, hardest_t2i, relative_in_batch = audit.in_batch_hardest(
        images, captions, args.batch_size, args.seed, family
    )
    result = {
        "embeddings": args.embeddings,
        "candidates": {"i2t": args.i2t, "t2i": args.t2i},
        "batch_size": args.batch_size,
        "seed": args.seed,
        "offline_size": args.offline_size,
        "duplicate_caption_groups": int(n_cap - groups.max() - 1),
        "relative_in_batch_share": None if family is None else float(relative_in_batch.mean()),
    }
    block_elems = args.block_mb * 2**20 // 4
    for direction in audit.directions(
        images, captions, i2t, t2i, args.offline_size, groups, hardest_i2t, hardest_t2i
    ):
        result[direction.name] = audit.audit_direction(direction, family=family, block_elems=block_elems)
        log.info("audit %s: %s", direction.name, json.dumps(result[direction.name]))
    if args.compare_i2t and args.compare_t2i:
        other_i2t = load_candidates(args.compare_i2t, n_img, n_cap, "image")
        other_t2i = load_candidates(args.compare_t2i, n_cap, n_img, "caption")
        result["overlap"] = {
            "with": args.compare_label,
            "i2t": audit.overlap_at_k(i2t, other_i2t, result["i2t"]["top_k"]),
            "t2i": audit.overlap_at_k(t2i, other_t2i, result["t2i"]["top_k"]),
        }
    plot_audit(result, args.out_png)
    write_text_atomic(args.out_json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
