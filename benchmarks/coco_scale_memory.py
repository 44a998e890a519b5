"""Peak memory of data loading, embedding extraction and mining on a COCO-sized training split.

Makes a training split of COCO's shape (113,287 x 36 x 2048 float32, 33.4 GB) as a *sparse* file
(no real values; it takes almost no disk), cached caption ids for 566,435 captions, and a
randomly initialised VSE++ checkpoint. Then, each in its own process so peak RSS is per phase:
  1. one epoch of training-batch loading (memory-mapped rows, cached ids; --aoq adds the offline
     negatives, three image reads per item),
  2. embedding extraction of the whole split to HDF5 (the pipeline's extract_embeddings step),
  3. offline candidate mining, i2t top 2000 and t2i top 400 (the mine_candidates step).
Prints, per phase, wall time and peak RSS against the feature file's size.

    python benchmarks/coco_scale_memory.py --workdir /var/tmp/coco_scale [--embed-size 128] [--aoq]
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_IMG, REGIONS, DIM = 113_287, 36, 2048


def make_split(workdir, n_img, dim, vocab=10_000):
    data, prepared = workdir / "coco_precomp", workdir / "prepared"
    data.mkdir(parents=True, exist_ok=True)
    prepared.mkdir(parents=True, exist_ok=True)
    ims = data / "train_ims.npy"
    if not ims.exists():
        np.lib.format.open_memmap(ims, mode="w+", dtype=np.float32, shape=(n_img, REGIONS, dim)).flush()
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 16, size=5 * n_img)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    np.savez(
        prepared / "train_ids.npz",
        ids=rng.integers(4, vocab, size=int(offsets[-1])).astype(np.int32),
        offsets=offsets,
    )
    info = {"split": "train", "n_images": n_img, "n_captions": 5 * n_img, "rows_per_image": 1, "img_dim": dim}
    (prepared / "manifest.json").write_text(json.dumps({"vocab_size": vocab, "splits": {"train": info}}))
    return data, prepared, ims.stat().st_size


def phase_load(data, prepared, aoq):
    import torch

    from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches
    from pipeline_steps.data.splits import open_split

    features, captions, info = open_split(data, prepared, "train")
    candidates = None
    if aoq:
        rng = np.random.default_rng(1)
        workdir = Path(prepared).parent
        np.save(workdir / "i2t.npy", rng.integers(0, info.n_captions, (info.n_images, 300), dtype=np.int32))
        np.save(workdir / "t2i.npy", rng.integers(0, info.n_images, (info.n_captions, 60), dtype=np.int32))
        candidates = OfflineCandidates(workdir / "i2t.npy", workdir / "t2i.npy", info.n_images, 300)
    batches = epoch_batches(info.n_captions, 128, seed=0, epoch=0)
    loader = torch.utils.data.DataLoader(
        TrainBatches(features, captions, batches, 0, 0, candidates), batch_size=None, num_workers=0
    )
    for _ in loader:
        pass


def phase_extract(data, prepared, workdir, embed_size):
    import torch

    from models import create_model
    from pipeline_steps import extract_embeddings
    from pipeline_steps.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("vsepp", vocab_size=10_000, img_dim=DIM, embed_size=embed_size, word_dim=64)
    save_checkpoint(workdir / "model.pt", model, seed=0)
    extract_embeddings.main(
        [
            "--checkpoint",
            str(workdir / "model.pt"),
            "--data",
            str(data),
            "--prepared",
            str(prepared),
            "--out",
            str(workdir / "train.h5"),
            "--device",
            "cpu",
            "--batch-size",
            "512",
        ]
    )


def phase_mine(workdir):
    from pipeline_steps import mine_candidates

    mine_candidates.main(
        [
            "--embeddings",
            str(workdir / "train.h5"),
            "--out-i2t",
            str(workdir / "i2t_coco.npy"),
            "--out-t2i",
            str(workdir / "t2i_coco.npy"),
            "--k-i2t",
            "2000",
            "--k-t2i",
            "400",
            "--device",
            "cpu",
            "--block-mb",
            "512",
        ]
    )


def run_phase(args, name):
    start = time.time()
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--workdir",
            str(args.workdir),
            "--phase",
            name,
            "--embed-size",
            str(args.embed_size),
            "--n-images",
            str(args.n_images),
        ]
        + (["--aoq"] if args.aoq else []),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{result.stderr[-3000:]}")
    peak_kib = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_kib"]
    return time.time() - start, peak_kib


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--embed-size", type=int, default=128)
    p.add_argument("--n-images", type=int, default=N_IMG)
    p.add_argument("--aoq", action="store_true")
    p.add_argument("--phase", choices=["load", "extract", "mine"])
    args = p.parse_args()
    data, prepared = args.workdir / "coco_precomp", args.workdir / "prepared"
    if args.phase:
        {
            "load": lambda: phase_load(data, prepared, args.aoq),
            "extract": lambda: phase_extract(data, prepared, args.workdir, args.embed_size),
            "mine": lambda: phase_mine(args.workdir),
        }[args.phase]()
        print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
        return
    _, _, size = make_split(args.workdir, args.n_images, DIM)
    print(f"feature file: {size / 2**30:.1f} GiB ({args.n_images} x {REGIONS} x {DIM} float32, sparse)")
    print(f"{'phase':<10} {'wall s':>8} {'peak RSS GiB':>13} {'RSS / file':>11}")
    for name in ("load", "extract", "mine"):
        wall, peak = run_phase(args, name)
        print(f"{name:<10} {wall:8.1f} {peak / 2**20:13.2f} {peak * 1024 / size:11.3f}", flush=True)


if __name__ == "__main__":
    main()
