"""Encode a split (the training split, for mining) with a trained model into HDF5.

Input:  a checkpoint, the precomp folder and the prepared folder.
Output: HDF5 with datasets `images` (N_img, d) and `captions` (N_cap, d) float32, one row per
        image, caption c belongs to image c // 5; attributes name the model, checkpoint and split.
        Rows are written block by block, so memory stays bounded at COCO scale.

Example:
    python -m pipeline_steps.extract_embeddings \
        --checkpoint results/demo_precomp/train/vsepp/baseline/seed0/model_best.pt \
        --data results/demo_data/demo_precomp --prepared results/demo_precomp/prepared \
        --split train --out results/embeddings/vsepp/seed0/train.h5
"""

import argparse
import logging
import sys

import h5py
from tqdm import tqdm

import accel
from pipeline_steps.common.atomic import atomic_path, remove_stale_temporaries
from pipeline_steps.common.device import pick_device, set_tf32
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.data.splits import open_split
from pipeline_steps.retrieval.encode import iter_caption_representations, iter_image_representations
from pipeline_steps.training.checkpoint import load_checkpoint

log = logging.getLogger("extract_embeddings")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    return p.parse_args(argv)


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    remove_stale_temporaries(args.out)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    set_tf32(False)  # full fp32, as the reference
    log.info("accelerated paths: %s", accel.summary())
    model, checkpoint = load_checkpoint(args.checkpoint, device)
    if not model.single_vector:
        raise SystemExit(
            f"error: model {model.name!r} has no single-vector embeddings; "
            "mine with an embedding model (config: mining.model)"
        )
    features, captions, info = open_split(args.data, args.prepared, args.split)
    with atomic_path(args.out) as tmp, h5py.File(tmp, "w") as h5:
        blocks = {
            "images": (iter_image_representations(model, features, args.batch_size, device), info.n_images),
            "captions": (
                iter_caption_representations(model, captions, info.n_captions, args.batch_size, device),
                info.n_captions,
            ),
        }
        for name, (blocks_iter, rows) in blocks.items():
            dataset = None
            for start, emb in tqdm(
                blocks_iter, desc=name, total=-(-rows // args.batch_size), mininterval=5, file=sys.stderr
            ):
                emb = emb.float().cpu().numpy()  # (b, d)
                if dataset is None:
                    dataset = h5.create_dataset(
                        name,
                        shape=(rows, emb.shape[1]),
                        dtype="float32",
                        chunks=(min(rows, 1024), emb.shape[1]),
                    )
                dataset[start : start + len(emb)] = emb
        h5.attrs.update(
            {
                "model": model.name,
                "checkpoint": str(args.checkpoint),
                "split": args.split,
                "epoch": checkpoint.get("epoch", -1),
                "seed": checkpoint.get("seed", -1),
            }
        )
    log.info("wrote %s: %d images, %d captions", args.out, info.n_images, info.n_captions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
