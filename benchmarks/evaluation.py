"""Evaluation ranks at COCO-5K size: ours against the reference's per-query sort and a pure GEMM.

5,000 images x 25,000 captions, d = 1024, float32, side by side in one process, repeated --runs
times in rotation; prints medians and ratios:
  ours       metrics.retrieval_ranks on an embedding scorer (one pass of blocks; both directions
             counted from each block; the positives read first from small diagonal blocks)
  reference  as the reference evaluation (i2t: for each image, a matrix-vector product with all
             captions and a full argsort, rank = best position of its 5 captions; t2i: for each
             image, its 5 captions against all images, an argsort per caption), numpy
  gemm       the 5,000 x 25,000 score matrix alone: one matrix product into a preallocated
             output (the fastest way to get the scores; nothing else)
The ranks of ours and the reference are checked to be equal before any timing is printed.

`--device cuda` runs ours and the GEMM on the GPU (the reference's loop stays numpy on the CPU);
`--json PATH` also writes the results (benchmarks/gpu_check.py reads them).

    python benchmarks/evaluation.py            # about 2 minutes on 2 cores
    python benchmarks/evaluation.py --quick    # 1,000 images
    python benchmarks/evaluation.py --device cuda
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.synthetic import CAPS, paired_embeddings  # noqa: E402
from pipeline_steps.retrieval import metrics, scorers  # noqa: E402


def embeddings(n_img, d, seed=0):
    return paired_embeddings(n_img, d, image_weight=0.3, seed=seed)


class Ours:
    """metrics.retrieval_ranks of the embedding scorer on `device` (numpy ranks back on the CPU)."""

    def __init__(self, device):
        self.device = device

    def __call__(self, img, cap):
        return metrics.retrieval_ranks(scorers.embedding_scorer(img, cap, device=self.device))


def reference(img, cap):
    n_img = img.shape[0]
    i2t = np.empty(n_img, dtype=np.int64)
    for q in range(n_img):
        order = np.argsort(np.dot(img[q : q + 1], cap.T).flatten())[::-1]
        i2t[q] = min(np.where(order == j)[0][0] for j in range(CAPS * q, CAPS * q + CAPS))
    t2i = np.empty(CAPS * n_img, dtype=np.int64)
    for q in range(n_img):
        scores = np.dot(cap[CAPS * q : CAPS * q + CAPS], img.T)  # (5, N)
        for i in range(CAPS):
            order = np.argsort(scores[i])[::-1]
            t2i[CAPS * q + i] = np.where(order == q)[0][0]
    return i2t, t2i


class Gemm:
    """The whole score matrix in one product, into an output allocated before timing."""

    def __init__(self, img, cap, device):
        self.img, self.cap = torch.from_numpy(img).to(device), torch.from_numpy(cap).to(device)
        self.out = torch.empty((img.shape[0], cap.shape[0]), device=device)
        self.out.fill_(0)  # touch the pages now, not in the timed call
        self.cuda = self.out.device.type == "cuda"
        if self.cuda:
            self(img, cap)  # start cuBLAS before the clock does

    def __call__(self, img, cap):
        torch.matmul(self.img, self.cap.T, out=self.out)
        if self.cuda:
            torch.cuda.synchronize()  # finished, not only queued


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-img", type=int, default=5000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--quick", action="store_true", help="1,000 images, 1 run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]: where ours and gemm run")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.n_img, args.runs = 1000, 1
    torch.set_num_threads(args.threads)
    img, cap = embeddings(args.n_img, args.dim)
    print(
        f"evaluation ranks, {args.n_img} images x {CAPS * args.n_img} captions, d={args.dim}, "
        f"{args.threads} threads, {args.runs} runs, ours on {args.device}, torch {torch.__version__}",
        flush=True,
    )
    ours = Ours(args.device)
    got, want = ours(img, cap), reference(img, cap)
    # Ties decide nothing here: float scores of random embeddings do not tie with positives.
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), "ranks differ"
    print("  ranks: ours == reference (i2t and t2i)", flush=True)
    methods = {"ours": ours, "reference": reference, "gemm": Gemm(img, cap, args.device)}
    times = {m: [] for m in methods}
    for run in range(args.runs):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(img, cap)
            times[name].append(time.perf_counter() - start)
            print(f"  run {run + 1} {name:9s} {times[name][-1]:8.3f} s", flush=True)
    med = {m: statistics.median(t) for m, t in times.items()}
    for m in methods:
        print(f"{m:9s} median {med[m]:8.3f} s  runs " + " ".join(f"{t:.3f}" for t in times[m]))
    print(f"speed-up reference / ours = {med['reference'] / med['ours']:.1f}x  (target >= 20)")
    print(f"ratio ours / gemm = {med['ours'] / med['gemm']:.2f}  (target <= 1.5)")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_rss:.0f} MiB")
    if args.json:
        settings = {k: getattr(args, k) for k in ("n_img", "dim", "threads", "device")}
        methods_out = {m: {"median_s": med[m], "runs_s": times[m]} for m in methods}
        figures = {"ranks_equal_reference": True, "peak_rss_mib": peak_rss}
        args.json.write_text(json.dumps({**settings, "methods": methods_out, **figures}))


if __name__ == "__main__":
    main()
