"""One check of this code on a GPU: the CUDA tests and the benchmarks on the device, one JSON.

Run through benchmarks/gpu_check.sh:
    bash benchmarks/gpu_check.sh                 # a CUDA GPU: under 8 minutes (--budget)
    bash benchmarks/gpu_check.sh --cpu-only      # the same parts on the CPU, small sizes

Parts, each in a process of its own with its share of the time budget:
  cuda_tests   pytest -rs tests/test_cuda.py tests/test_autocast.py: AMP bf16 and fp16 training
               steps, the cuDNN GRU against the CPU path, fp16/bf16 mining against fp32 brute
               force, evaluation on the device, the GPU slot wrapper, bf16 autocast of every model
  train_step   benchmarks/train_step.py: AdapOffQuin steps of VSRN, SCAN and BFAN on the device
  mining       benchmarks/mining.py: both directions on the device (and in float16 on a GPU), the
               GEMM floor, faiss-cpu beside them when it is installed
  evaluation   benchmarks/evaluation.py: exact ranks on the device against the reference's loop
Each part's entry: status (ok; failed; timeout; skipped, with a reason), seconds, the command, the
end of its output and its results. The environment (torch, CUDA, cuDNN, GPU, driver) comes first.
Exit status 1 when a part failed or ran out of time.

--cpu-only hides every GPU from the parts (CUDA_VISIBLE_DEVICES=""): the CUDA tests then skip
themselves and the part reads `skipped`, with their reasons; the CPU-side tests of the same files
run. Sizes: full (the README's figures; the default on a GPU), quick (seconds each; the default
with --cpu-only), tiny (the smallest that still runs every code path; the test uses it).
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: accel and the tests import from the repository
DEFAULT_OUT = "results/benchmarks/gpu_check.json"
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_autocast.py"]
# The benchmarks' options for each size; a list of runs per part (mining runs twice on a GPU:
# float32 against faiss and the GEMM, then float16 alone).
SIZES = {
    "full": {
        "train_step": [["--runs", "3"]],
        "mining": [["--runs", "1"], ["--runs", "1", "--dtype", "float16", "--methods", "ours"]],
        "evaluation": [["--runs", "1"]],
    },
    "quick": {
        "train_step": [["--quick", "--runs", "1"]],
        "mining": [["--quick"]],
        "evaluation": [["--quick"]],
    },
    "tiny": {
        "train_step": [["--quick", "--batch", "4", "--runs", "1"]],
        "mining": [["--n-img", "200", "--dim", "32", "--k-i2t", "20", "--k-t2i", "5", "--runs", "1"]],
        "evaluation": [["--n-img", "200", "--dim", "32", "--runs", "1"]],
    },
}
# Shares of the budget: a part may use what the ones before it left over.
SHARES = {"cuda_tests": 0.35, "train_step": 0.3, "mining": 0.2, "evaluation": 0.15}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-only", action="store_true", help="run every part on the CPU (no GPU needed)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the JSON to write (default {DEFAULT_OUT})")
    p.add_argument(
        "--size", choices=sorted(SIZES), help="benchmark sizes (default: full on a GPU, else quick)"
    )
    p.add_argument("--budget", type=float, default=470, help="seconds for all parts together")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of the benchmarks")
    return p.parse_args(argv)


def environment(device):
    """What the figures depend on: versions, the GPU, the CPU, what compiled."""
    import torch

    import accel

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "faiss": _version_of("faiss", ["faiss-cpu", "faiss-gpu", "faiss"]),
        "accel": accel.summary(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu_count=torch.cuda.device_count(),
            gpu_name=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            nvidia_driver=_nvidia_driver(),
        )
    return env


def _version_of(module, distributions):
    """The installed version of `module` (from its package's metadata, without importing it)."""
    if importlib.util.find_spec(module) is None:
        return None
    for name in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{name} {importlib.metadata.version(name)}"
    return "installed"


def _nvidia_driver():
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    proc = subprocess.run(query, capture_output=True, text=True, timeout=60)
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def run_part(command, timeout, env):
    """(status, seconds, end of the output) of one command; status ok, failed or timeout."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 1)
        )
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout
        return "timeout", time.perf_counter() - start, (output or "")[-3000:]
    status = "ok" if proc.returncode == 0 else "failed"
    return status, time.perf_counter() - start, (proc.stdout + proc.stderr)[-3000:]


def junit_summary(path):
    """Counts and skip reasons from pytest's JUnit XML."""
    counts, skips, failures = {"passed": 0, "failed": 0, "skipped": 0}, {}, []
    for case in ET.parse(path).iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        skipped = case.find("skipped")
        failed = case.find("failure") is not None or case.find("error") is not None
        if skipped is not None:
            counts["skipped"] += 1
            reason = skipped.get("message", "")
            skips[reason] = skips.get(reason, 0) + 1
        elif failed:
            counts["failed"] += 1
            failures.append(name)
        else:
            counts["passed"] += 1
    return counts, [{"reason": r, "tests": n} for r, n in skips.items()], failures


def cuda_tests(end, env, device, workdir):
    report = Path(workdir) / "cuda_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
    command += ["--junitxml", str(report), *CUDA_TESTS]
    status, seconds, output = run_part(command, end - time.perf_counter(), env)
    part = {"status": status, "seconds": seconds, "command": command, "output_tail": output}
    if not report.exists():
        return part
    counts, skips, failures = junit_summary(report)
    part.update(counts, skips=skips, failures=failures)
    if status == "ok" and counts["passed"] + counts["skipped"] == 0:
        part["status"] = "failed"  # no test ran at all
    elif status == "ok" and device == "cpu" and counts["skipped"]:
        part["status"] = "skipped"
        part["reason"] = (
            f"no CUDA device (--cpu-only): the {counts['skipped']} CUDA tests skipped themselves; "
            f"the {counts['passed']} CPU-side tests of the same files passed"
        )
    return part


def benchmark(name, runs, end, env, device, threads, workdir):
    """One benchmark script, once per option list in `runs`; its --json results, in order."""
    part = {"status": "ok", "seconds": 0.0, "commands": [], "results": [], "output_tail": ""}
    for i, options in enumerate(runs):
        out = Path(workdir) / f"{name}_{i}.json"
        command = [sys.executable, f"benchmarks/{name}.py", *options, "--threads", str(threads)]
        command += ["--device", device, "--json", str(out)]
        status, seconds, output = run_part(command, end - time.perf_counter(), env)
        part["seconds"] += seconds
        part["commands"].append(command)
        part["output_tail"] += output
        if status != "ok":
            part["status"] = status
            break
        part["results"].append(json.loads(out.read_text()))
    return part


def part_ends(budget, start):
    """When each part must have finished (perf_counter time): its share of the budget after the
    end of the one before, so a part may use what earlier parts left unused."""
    ends, at = {}, start
    for part, share in SHARES.items():
        at += share * budget
        ends[part] = at
    return ends


def main(argv=None):
    args = parse_args(argv)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    if args.cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # hidden from every part, so nothing touches a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # and from this process's environment() too
    import torch

    if not args.cpu_only and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_check: no CUDA device found (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); `--cpu-only` runs the CPU-side parts"
        )
    device = "cpu" if args.cpu_only else "cuda"
    size = args.size or ("quick" if args.cpu_only else "full")
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report = {"device": device, "size": size, "started": started, "environment": environment(device)}
    start = time.perf_counter()
    ends, parts = part_ends(args.budget, start), {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        print(f"gpu_check on {device}, {size} sizes, budget {args.budget:.0f} s", flush=True)
        for name in SHARES:
            if ends[name] - time.perf_counter() < 1:
                parts[name] = {"status": "timeout", "seconds": 0.0, "reason": "the budget was spent"}
            elif name == "cuda_tests":
                parts[name] = cuda_tests(ends[name], env, device, workdir)
            else:
                runs = SIZES[size][name]
                parts[name] = benchmark(name, runs, ends[name], env, device, args.threads, workdir)
            print(f"  {name}: {parts[name]['status']} ({parts[name]['seconds']:.1f} s)", flush=True)
    report["parts"] = parts
    report["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out} in {report['seconds']:.0f} s", flush=True)
    return 1 if any(p["status"] in ("failed", "timeout") for p in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
