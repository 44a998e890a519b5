"""Offline candidate mining, both directions: ours (one pass) against faiss-cpu and a pure GEMM.

At Flickr30K's training size (29,000 images, 145,000 captions, d = 1024, float32), i2t top 2000
and t2i top 400 with positives excluded. Side by side in one run, each method in a fresh Python
process of its own (its peak RSS is its own, and faiss's OpenMP/OpenBLAS never share a process
with torch's), repeated --runs times in rotation; prints the medians and the ratios:
  ours      mine_both (compiled running top-k fed by one GEMM per tile)
  faiss     IndexFlatIP: captions searched by the images (k_i2t + 5) and images by the captions
            (k_t2i + 1): the two searches a faiss user would run. Only the two searches are
            timed (dropping the positives afterwards is not), in faiss's favour. faiss-cpu's
            wheel bundles OpenBLAS 0.3.15, which does not know recent CPUs (Sapphire Rapids)
            and falls back to generic kernels about 4x slower; the faiss process therefore gets
            OPENBLAS_CORETYPE=SkylakeX (Haswell without AVX-512) unless you set it yourself
  gemm      the score matrix alone, in the same tiles, nothing selected (a floor for any method)
Correctness: every method's lists are checked against a float64 brute force on a sample of
queries (equal, except where the k-th and (k+1)-th scores are within 1e-5: fp32 rounding).

`--device cuda` runs ours (the torch engine, in --dtype float32, float16 or bfloat16) and the GEMM
on the GPU; faiss stays faiss-cpu. Without faiss installed its comparison is skipped and said so.
`--json PATH` also writes the results (benchmarks/gpu_check.py reads them).

    python benchmarks/mining.py                # the issue's size; about 8 minutes on 2 cores
    python benchmarks/mining.py --quick        # 2,000 images, seconds
    python benchmarks/mining.py --device cuda --dtype float16 --methods ours
The faiss comparison needs faiss-cpu (envs/benchmarks.txt).
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.synthetic import CAPS, paired_embeddings  # noqa: E402
from pipeline_steps.retrieval import mining  # noqa: E402


def embeddings(n_img, d, seed=0):
    return paired_embeddings(n_img, d, image_weight=0.5, seed=seed)


def run_ours(img, cap, k_i2t, k_t2i, threads, device="cpu", dtype="float32"):
    out_i = np.empty((img.shape[0], k_i2t), np.int32)
    out_t = np.empty((cap.shape[0], k_t2i), np.int32)
    if torch.device(device).type == "cpu":
        mining.mine_both(img, cap, k_i2t, k_t2i, out_i, out_t, engine="native", threads=threads)
    else:  # the engine the pipeline's mine_candidates uses on a GPU
        dtype = getattr(torch, dtype)
        mining.mine_both(img, cap, k_i2t, k_t2i, out_i, out_t, device=device, dtype=dtype, engine="torch")
    return out_i, out_t


def drop_positives(found, own_of, k):
    """Rows of search results with each query's positives removed, cut to k."""
    out = np.empty((found.shape[0], k), np.int32)
    for q in range(found.shape[0]):
        row = found[q]
        out[q] = row[~np.isin(row, own_of(q))][:k]
    return out


def run_faiss(img, cap, k_i2t, k_t2i, threads, **_):  # faiss-cpu: on the CPU wherever ours runs
    import faiss

    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index = faiss.IndexFlatIP(cap.shape[1])
    index.add(cap)
    _, i2t = index.search(img, k_i2t + CAPS)
    index = faiss.IndexFlatIP(img.shape[1])
    index.add(img)
    _, t2i = index.search(cap, k_t2i + 1)
    seconds = time.perf_counter() - start
    return Timed(
        seconds,
        (
            drop_positives(i2t, lambda q: np.arange(CAPS * q, CAPS * q + CAPS), k_i2t),
            drop_positives(t2i, lambda c: np.array([c // CAPS]), k_t2i),
        ),
    )


def run_gemm(img, cap, k_i2t, k_t2i, threads, device="cpu", dtype="float32"):
    dtype = getattr(torch, dtype)
    q_all, c_all = torch.from_numpy(img).to(device, dtype), torch.from_numpy(cap).to(device, dtype)
    tile = torch.empty((mining.NATIVE_BLOCK_ROWS, mining.NATIVE_TILE_COLS), device=device, dtype=dtype)
    checksum = 0.0
    for a in range(0, img.shape[0], mining.NATIVE_BLOCK_ROWS):
        q = q_all[a : a + mining.NATIVE_BLOCK_ROWS]
        for c0 in range(0, cap.shape[0], mining.NATIVE_TILE_COLS):
            c = c_all[c0 : c0 + mining.NATIVE_TILE_COLS]
            out = tile[: q.shape[0], : c.shape[0]]
            if not out.is_contiguous():
                out = torch.empty((q.shape[0], c.shape[0]), device=device, dtype=dtype)
            torch.matmul(q, c.T, out=out)
            checksum += float(out[0, 0])
    return None


class Timed:
    """A result that brings its own timing (of the part that counts)."""

    def __init__(self, seconds, result):
        self.seconds, self.result = seconds, result


METHODS = {"ours": run_ours, "faiss": run_faiss, "gemm": run_gemm}


def _openblas_coretype():
    """The newest OpenBLAS core type this CPU runs (faiss-cpu's bundled OpenBLAS cannot tell)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return "SkylakeX" if "avx512f" in flags else "Haswell" if "avx2" in flags else None


def in_child(method, workdir, args, keep_result):
    """Run one method in a fresh interpreter; return (seconds, peak RSS MiB, result or None)."""
    env = dict(os.environ)
    if method == "faiss" and "OPENBLAS_CORETYPE" not in env and _openblas_coretype():
        env["OPENBLAS_CORETYPE"] = _openblas_coretype()
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--workdir",
        str(workdir),
        "--k-i2t",
        str(args.k_i2t),
        "--k-t2i",
        str(args.k_t2i),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    if keep_result:
        cmd.append("--keep-result")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = status
    if status != 0:
        raise RuntimeError(f"{method} failed in its child process (status {status})")
    seconds = float(out.strip().splitlines()[-1])
    result = None
    if keep_result and (workdir / f"{method}_i2t.npy").exists():
        result = (np.load(workdir / f"{method}_i2t.npy"), np.load(workdir / f"{method}_t2i.npy"))
    return seconds, usage.ru_maxrss / 1024, result


def child(args):
    """Inside the fresh process: load the embeddings, time the method, print the seconds."""
    img = np.load(args.workdir / "img.npy")
    cap = np.load(args.workdir / "cap.npy")
    if args.child != "faiss":
        torch.set_num_threads(args.threads)
        if torch.device(args.device).type == "cuda":  # start CUDA and cuBLAS before the clock does
            torch.ones(8, 8, device=args.device).matmul(torch.ones(8, 8, device=args.device)).sum().item()
    start = time.perf_counter()
    result = METHODS[args.child](
        img, cap, args.k_i2t, args.k_t2i, args.threads, device=args.device, dtype=args.dtype
    )
    seconds = time.perf_counter() - start
    if isinstance(result, Timed):
        seconds, result = result.seconds, result.result
    if args.keep_result and result is not None:
        np.save(args.workdir / f"{args.child}_i2t.npy", result[0])
        np.save(args.workdir / f"{args.child}_t2i.npy", result[1])
    print(seconds)


def sample_errors(img, cap, out_i, out_t, k_i2t, k_t2i, n_sample=64, tol=1e-5):
    """Queries whose lists differ from a float64 brute force beyond fp32 rounding at the cut."""
    rng = np.random.default_rng(1)
    bad = 0
    img64, cap64 = img.astype(np.float64), cap.astype(np.float64)  # once, not once per query
    for q in rng.choice(img.shape[0], min(n_sample, img.shape[0]), replace=False):
        s = cap64 @ img64[q]
        s[CAPS * q : CAPS * q + CAPS] = -np.inf
        bad += _differs(s, out_i[q], k_i2t, tol)
    for c in rng.choice(cap.shape[0], min(n_sample, cap.shape[0]), replace=False):
        s = img64 @ cap64[c]
        s[c // CAPS] = -np.inf
        bad += _differs(s, out_t[c], k_t2i, tol)
    return bad


def _differs(scores, got, k, tol):
    want = np.argsort(-scores, kind="stable")[:k]
    if set(want.tolist()) == set(got.tolist()):
        return 0
    kth = scores[want[-1]]
    # Only items scoring within tol of the k-th may be swapped by fp32 rounding.
    swapped = set(want.tolist()) ^ set(got.tolist())
    return int(any(abs(scores[j] - kth) > tol for j in swapped))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-img", type=int, default=29_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k-i2t", type=int, default=2000)
    p.add_argument("--k-t2i", type=int, default=400)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--methods", default="ours,faiss,gemm")
    p.add_argument("--quick", action="store_true", help="2,000 images (k scaled down), 1 run")
    p.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--keep-result", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]: where ours and gemm run")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", type=Path, help="also write the results to this file")
    args = p.parse_args(argv)
    if args.dtype != "float32" and torch.device(args.device).type != "cuda":
        p.error(f"--dtype {args.dtype} needs --device cuda (the CPU engine scores in float32)")
    if args.child:
        return child(args)
    if args.quick:
        args.n_img, args.k_i2t, args.k_t2i, args.runs = 2000, 140, 28, 1
    methods = args.methods.split(",")
    skipped = {}
    if "faiss" in methods and importlib.util.find_spec("faiss") is None:
        methods.remove("faiss")
        skipped["faiss"] = "faiss is not installed (pip install -r envs/benchmarks.txt)"
        print(f"faiss: skipped, {skipped['faiss']}", flush=True)
    img, cap = embeddings(args.n_img, args.dim)
    print(
        f"mining {args.n_img} images x {CAPS * args.n_img} captions, d={args.dim}, "
        f"k_i2t={args.k_i2t}, k_t2i={args.k_t2i}, {args.threads} threads, {args.runs} runs, "
        f"ours on {args.device} in {args.dtype}, torch {torch.__version__}",
        flush=True,
    )
    times = {m: [] for m in methods}
    rss, differing = {}, {}
    with tempfile.TemporaryDirectory(prefix="mining-bench-") as tmp:
        workdir = Path(tmp)
        np.save(workdir / "img.npy", img)
        np.save(workdir / "cap.npy", cap)
        for run in range(args.runs):
            for m in methods:
                seconds, peak, result = in_child(m, workdir, args, keep_result=run == 0)
                times[m].append(seconds)
                rss[m] = max(rss.get(m, 0), peak)
                if result is not None:
                    bad = differing[m] = sample_errors(img, cap, *result, args.k_i2t, args.k_t2i)
                    print(f"  {m}: sampled lists differing from float64 brute force: {bad}", flush=True)
                print(f"  run {run + 1} {m:6s} {seconds:8.2f} s", flush=True)
    med = {m: statistics.median(t) for m, t in times.items()}
    for m in methods:
        print(
            f"{m:6s} median {med[m]:8.2f} s  peak RSS {rss[m]:8.0f} MiB  runs "
            + " ".join(f"{t:.2f}" for t in times[m])
        )
    if "ours" in med and "faiss" in med:
        print(f"ratio ours / faiss = {med['ours'] / med['faiss']:.2f}  (target <= 0.6)")
    if "ours" in med and "gemm" in med:
        print(f"ratio ours / gemm  = {med['ours'] / med['gemm']:.2f}")
    if args.json:
        settings = ("n_img", "dim", "k_i2t", "k_t2i", "threads", "device", "dtype")
        methods_out = {
            m: {
                "median_s": med[m],
                "runs_s": times[m],
                "peak_rss_mib": rss[m],
                "sampled_differing": differing.get(m),
            }
            for m in methods
        }
        args.json.write_text(
            json.dumps(
                {**{k: getattr(args, k) for k in settings}, "methods": methods_out, "skipped": skipped}
            )
        )


if __name__ == "__main__":
    main()
