"""Is the training data path ever the bottleneck? Batch-building time against the training step.

Builds a training split in a work folder: `--n-images` x 36 x 2048 float32 region features as a
memory-mapped .npy (random values; 20,000 images = 5.9 GB), cached caption ids (COCO-like
lengths) and offline candidate files. Then, with the pipeline's own data path (TrainBatches over
memory-mapped rows and cached ids, AOQ offline negatives I3/T3 and I4/T4, VSRN's caption targets,
torch DataLoader with `--workers` processes):
  1. loader alone: seconds per batch (B anchors + 2 B offline images and captions);
  2. loader + our training step of `--model` at full size (pipeline_steps.training.step.training_loss,
     backward, clip, Adam), as the training loop runs it: the time the step waits for the next
     batch, and its share of the loop.
`--cold` evicts the feature file from the page cache before each measurement (posix_fadvise on
that file only), as when the split does not fit in memory (COCO's 33 GB).

    python benchmarks/data_loader.py --model scan                       # 5.9 GB file, 2 threads
    OMP_NUM_THREADS=1 python benchmarks/data_loader.py --quick --threads 1
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.train_step import FULL, QUICK, Ours, model_config  # noqa: E402

REGIONS, K_I2T, K_T2I = 36, 300, 60


def make_split(workdir, n_images, img_dim, vocab, seed=0):
    """Feature memmap (reused when already there), cached ids and candidate files."""
    rng = np.random.default_rng(seed)
    data, prepared = workdir / "data", workdir / "prepared"
    data.mkdir(parents=True, exist_ok=True)
    prepared.mkdir(parents=True, exist_ok=True)
    ims = data / "train_ims.npy"
    if not ims.exists() or np.load(ims, mmap_mode="r").shape != (n_images, REGIONS, img_dim):
        feats = np.lib.format.open_memmap(
            ims, mode="w+", dtype=np.float32, shape=(n_images, REGIONS, img_dim)
        )
        for start in range(0, n_images, 1000):
            stop = min(n_images, start + 1000)
            feats[start:stop] = rng.standard_normal((stop - start, REGIONS, img_dim), dtype=np.float32)
        feats.flush()
        del feats
    n_caps = 5 * n_images
    lengths = np.clip(np.rint(rng.normal(10.5, 2.4, n_caps)), 1, None).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    np.savez(
        prepared / "train_ids.npz",
        ids=rng.integers(4, vocab, int(offsets[-1])).astype(np.int32),
        offsets=offsets,
    )
    np.save(workdir / "i2t.npy", rng.integers(0, n_caps, (n_images, K_I2T)).astype(np.int32))
    np.save(workdir / "t2i.npy", rng.integers(0, n_images, (n_caps, K_T2I)).astype(np.int32))


def split_of(workdir, n_images, img_dim):
    """(features folder, prepared folder, SplitInfo) of the split make_split wrote."""
    from pipeline_steps.data.precomp import SplitInfo

    return workdir / "data", workdir / "prepared", SplitInfo("train", n_images, 5 * n_images, 1, img_dim)


def evict(path):
    """Drop the file's pages from the page cache (this file only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def loader_for(args, workdir, split, caption_targets, epoch):
    from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches
    from pipeline_steps.data.precomp import ImageFeatures
    from pipeline_steps.data.text import CaptionIds

    data, prepared, info = split
    features = ImageFeatures(data, info)
    candidates = OfflineCandidates(workdir / "i2t.npy", workdir / "t2i.npy", info.n_images, K_I2T)
    batches = epoch_batches(info.n_captions, args.batch, args.seed, epoch)
    dataset = TrainBatches(
        features,
        CaptionIds(prepared / "train_ids.npz"),
        batches,
        args.seed,
        epoch,
        candidates,
        caption_targets=caption_targets,
    )
    if args.cold:
        evict(features.path)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=args.workers_now,
        generator=torch.Generator().manual_seed(args.seed),
    )


def loader_alone(args, workdir, split, caption_targets, epoch):
    """Seconds per batch over `args.batches` batches after one (worker start-up excluded)."""
    it = iter(loader_for(args, workdir, split, caption_targets, epoch))
    next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    return (time.perf_counter() - start) / args.batches


def loader_with_step(args, workdir, split, trainer, epoch):
    """(median step s, median wait s, share of waiting in the loop) over `args.batches` steps."""
    caption_targets = trainer.model.caption_targets_of if trainer.model.needs_caption_targets else None
    it = iter(loader_for(args, workdir, split, caption_targets, epoch))
    trainer.step(next(it))  # warm-up: worker start-up and first-step allocations
    waits, steps = [], []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        batch = next(it)
        t1 = time.perf_counter()
        trainer.step(batch)
        waits.append(t1 - t0)
        steps.append(time.perf_counter() - t1)
    return statistics.median(steps), statistics.median(waits), sum(waits) / (sum(waits) + sum(steps))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, help="where the split is made (default: a temporary folder)")
    p.add_argument("--n-images", type=int, help="default 20,000 (quick: 600)")
    p.add_argument(
        "--model",
        default="scan",
        choices=["vsrn", "scan", "bfan", "none"],
        help="whose training step the loader is measured against (none: loader only)",
    )
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare")
    p.add_argument("--batch", type=int, help="default 128 (quick: 16)")
    p.add_argument("--batches", type=int, default=5, help="measured batches per setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cold", action="store_true", help="evict the feature file from the page cache first")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = dict(QUICK if args.quick else FULL)
    args.batch = args.batch or sizes["batch"]
    sizes["batch"] = args.batch
    n_images = args.n_images or (600 if args.quick else 20_000)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args, args.workdir, sizes, n_images)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(args, Path(tmp), sizes, n_images)


def run(args, workdir, sizes, n_images):
    t0 = time.perf_counter()
    # written in a child process, so the peak RSS below is the data path's and the step's only
    writer = multiprocessing.get_context("fork").Process(
        target=make_split, args=(workdir, n_images, sizes["img_dim"], sizes["vocab"], args.seed)
    )
    writer.start()
    writer.join()
    if writer.exitcode != 0:
        raise SystemExit("making the split failed")
    split = split_of(workdir, n_images, sizes["img_dim"])
    gib = split[2].n_images * REGIONS * sizes["img_dim"] * 4 / 2**30
    print(
        f"{'QUICK ' if args.quick else ''}split: {n_images} images x {REGIONS} x {sizes['img_dim']} "
        f"float32 ({gib:.2f} GiB, made in {time.perf_counter() - t0:.0f} s), B={args.batch} "
        f"+ offline negatives, {args.threads} threads{', cold page cache' if args.cold else ''}",
        flush=True,
    )
    trainer = None
    if args.model != "none":
        from models import create_model

        torch.manual_seed(args.seed)
        trainer = Ours(create_model(args.model, **model_config(args.model, sizes)), 2e-4)
    targets = trainer.model.caption_targets_of if trainer and trainer.model.needs_caption_targets else None
    results = []
    for epoch, workers in enumerate(int(w) for w in args.workers.split(",")):
        args.workers_now = workers
        per_batch = loader_alone(args, workdir, split, targets, 2 * epoch)
        line = {"workers": workers, "loader_s_per_batch": per_batch}
        text = f"workers {workers}: loader alone {per_batch:.3f} s/batch"
        if trainer is not None:
            step, wait, share = loader_with_step(args, workdir, split, trainer, 2 * epoch + 1)
            line.update(step_s=step, wait_s=wait, loader_share=share)
            text += (
                f"  |  {args.model} training step {step:.2f} s, waiting for the batch "
                f"{wait:.3f} s, loader share of the loop {100 * share:.1f}%"
            )
        print(text, flush=True)
        results.append(line)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS (main process) {peak:.2f} GiB")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
