"""The mining audit against the mining it audits, at Flickr30K's training size.

29,000 images x 145,000 captions, d = 1024, float32 (synthetic, benchmarks/synthetic.py), mined
with the pipeline's defaults (i2t top 2000, t2i top 400) and audited with its defaults (AOQ batch
128, offline_size 300: scores at ranks 1, 10, 100 and 300 both ways, one epoch of online batches,
duplicate-caption and above-positive shares over the top 300 / 60). Both are the pipeline's own
steps (`python -m pipeline_steps.mine_candidates`, `... audit_mining`), each in a fresh process
so that its peak RSS is its own, repeated --runs times in rotation; prints the medians and the
audit/mining ratios of wall time and peak memory. The issue asks that both stay at most 1.

    python benchmarks/mining_audit.py            # Flickr30K size; about 3 minutes on 2 cores
    python benchmarks/mining_audit.py --quick    # 2,000 images, seconds
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.synthetic import CAPS, paired_embeddings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_inputs(folder, n_img, d):
    img, cap = paired_embeddings(n_img, d, image_weight=0.5)
    with h5py.File(folder / "train.h5", "w") as h5:
        h5["images"], h5["captions"] = img, cap
    # Token ids of 8 to 15 words; one caption in 100 repeats another's words (COCO repeats captions).
    rng = np.random.default_rng(1)
    captions = [rng.integers(4, 5000, size=rng.integers(8, 16)) for _ in range(CAPS * n_img)]
    for c in rng.choice(len(captions), size=len(captions) // 100, replace=False):
        captions[c] = captions[rng.integers(len(captions))]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in captions])])
    np.savez(folder / "train_ids.npz", ids=np.concatenate(captions).astype(np.int32), offsets=offsets)


def timed(command):
    """Wall seconds and peak RSS (MiB) of a command run in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=29000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2,000 images")
    args = p.parse_args()
    n_img = 2000 if args.quick else args.images
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_inputs(folder, n_img, args.dim)
        files = [f"--out-i2t={folder / 'i2t.npy'}", f"--out-t2i={folder / 't2i.npy'}"]
        mine = [
            sys.executable,
            "-m",
            "pipeline_steps.mine_candidates",
            "--embeddings",
            str(folder / "train.h5"),
        ]
        mine += [*files, "--k-i2t", "2000", "--k-t2i", "400", "--threads", str(args.threads)]
        audit = [
            sys.executable,
            "-m",
            "pipeline_steps.audit_mining",
            "--embeddings",
            str(folder / "train.h5"),
        ]
        audit += ["--i2t", str(folder / "i2t.npy"), "--t2i", str(folder / "t2i.npy")]
        audit += ["--caption-ids", str(folder / "train_ids.npz"), "--threads", str(args.threads)]
        audit += ["--out-json", str(folder / "audit.json"), "--out-png", str(folder / "audit.png")]
        results = {"mining": [], "audit": []}
        for _ in range(args.runs):
            results["mining"].append(timed(mine))
            results["audit"].append(timed(audit))
    seconds = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    peak = {k: statistics.median(m for _, m in v) for k, v in results.items()}
    print(
        f"{n_img} images x {CAPS * n_img} captions, d={args.dim}, {args.threads} threads, {args.runs} run(s)"
    )
    for name in ("mining", "audit"):
        runs = ", ".join(f"{s:.2f}" for s, _ in results[name])
        print(f"{name:7s} {seconds[name]:8.2f} s (runs {runs}), peak RSS {peak[name] / 1024:.2f} GiB")
    ratios = seconds["audit"] / seconds["mining"], peak["audit"] / peak["mining"]
    print(f"audit / mining: time {ratios[0]:.2f}, peak memory {ratios[1]:.2f}")


if __name__ == "__main__":
    main()
