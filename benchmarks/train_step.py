"""Time one AOQ training step of our VSRN, SCAN and BFAN against reference-style steps.

A step is what the training loop does per batch: the anchor pass plus the offline I3/T3 and I4/T4
passes (`pipeline_steps.training.step.training_loss`), the AdapOffQuin loss (+ VSRN's captioning loss),
backward, total-norm clipping at 2.0 and the Adam update (`Optimizers`, VSRN's doubled captioning
update included, as the parity default). The comparison (`benchmarks/reference_style.py`) keeps
the reference's computation structure: per-caption Python loops for SCAN/BFAN, the full-length
decoder, Conv1d GCN and duplicated parameter list for VSRN. Both start from the same weights and
the same seed; the first (warm-up) step of each prints the loss and gradient-norm differences.

Each model runs in its own process (ours, then the reference; peak RSS is reported after each).
Default sizes are the paper's: B = 128, 36 regions x 2048, COCO-like caption lengths (10.5 +- 2.4
words), vocabulary 10,000, embed 2048 (VSRN) / 1024 (SCAN, BFAN). `--quick` shrinks everything for
a smoke run.

`--device cuda` times our step on the GPU alone (the reference-style steps are CPU code), with
the peak GPU memory; `--json PATH` also writes the results (benchmarks/gpu_check.py reads them).

    python benchmarks/train_step.py                  # full size, 2 threads (several minutes)
    python benchmarks/train_step.py --models scan --products   # + time inside matrix products
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --quick --threads 1
    python benchmarks/train_step.py --device cuda    # ours on the GPU, full size
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("vsrn", "scan", "bfan")
TARGETS = {"vsrn": ("<=", 0.8), "scan": ("<=", 0.25), "bfan": ("<=", 0.25)}  # ours / reference
FULL = dict(
    batch=128,
    img_dim=2048,
    vocab=10_000,
    embed={"vsrn": 2048, "scan": 1024, "bfan": 1024},
    word_dim=300,
    dim_hidden=512,
    dim_word=300,
)
QUICK = dict(
    batch=16,
    img_dim=128,
    vocab=500,
    embed={"vsrn": 64, "scan": 64, "bfan": 64},
    word_dim=32,
    dim_hidden=32,
    dim_word=32,
)
LR = 2e-4


def model_config(name, sizes):
    cfg = dict(
        vocab_size=sizes["vocab"],
        img_dim=sizes["img_dim"],
        embed_size=sizes["embed"][name],
        word_dim=sizes["word_dim"],
    )
    if name == "vsrn":
        cfg.update(dim_hidden=sizes["dim_hidden"], dim_word=sizes["dim_word"])
    return cfg


def caption_ids(rng, n, vocab, mean, std):
    """Word ids of n captions with COCO-like lengths (at least 1 word)."""
    lengths = np.clip(np.rint(rng.normal(mean, std, size=n)), 1, None).astype(int)
    return [rng.integers(4, vocab, size=k) for k in lengths]


def make_batch(model, sizes, rng, words_mean, words_std):
    """A training batch as TrainBatches builds it: anchors, (T3, I3), (T4, I4), caption targets."""
    from pipeline_steps.data.batches import pad_captions

    b = sizes["batch"]
    batch = {"index": torch.arange(b)}
    for prefix in ("", "neg_", "pos2_"):
        tokens = caption_ids(rng, b, sizes["vocab"], words_mean, words_std)
        ids, lengths = pad_captions([np.concatenate(([1], t, [2])).astype(np.int64) for t in tokens])
        key = "images" if not prefix else prefix + "images"
        batch[key] = torch.from_numpy(rng.standard_normal((b, 36, sizes["img_dim"]), dtype=np.float32))
        batch[prefix + "ids"], batch[prefix + "lengths"] = ids, lengths
        if not prefix and model.needs_caption_targets:
            labels, masks = zip(*(model.caption_targets_of(t) for t in tokens))
            batch["cap_labels"] = torch.from_numpy(np.stack(labels))
            batch["cap_masks"] = torch.from_numpy(np.stack(masks))
    return batch


class Ours:
    """Our training step, as pipeline_steps/train.py runs it."""

    def __init__(self, model, lr, grad_clip=2.0, device="cpu"):
        from models.losses import LossConfig
        from pipeline_steps.training.optim import Optimizers

        self.model, self.grad_clip, self.device = model, grad_clip, device
        self.loss_cfg = LossConfig(variant="adapoffquin")
        self.optimizer = Optimizers(model, lr)
        model.train()

    def step(self, batch):
        from pipeline_steps.training.step import training_loss

        loss, _ = training_loss(self.model, batch, self.loss_cfg, self.device)
        self.optimizer.zero_grad()
        loss.backward()
        norm = self.optimizer.clip(self.grad_clip)
        self.optimizer.step()
        return float(loss.detach()), float(norm)


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(trainer, batch, seed):
    """(wall s, process CPU s, loss, total gradient norm) of one step."""
    torch.manual_seed(seed)  # the same dropout masks for both implementations
    start, cpu = time.perf_counter(), time.process_time()
    loss, norm = trainer.step(batch)
    if torch.device(getattr(trainer, "device", "cpu")).type == "cuda":
        torch.cuda.synchronize()  # the step's kernels have finished, not only been queued
    return time.perf_counter() - start, time.process_time() - cpu, loss, norm


PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm")


def product_seconds(trainer, batch, seed):
    """(step wall s, s inside matrix-product kernels) of one profiled step.

    What no rewrite of the elementwise work can remove: the products a step needs (the encoders'
    linear maps and GRU steps, the word-region products). The profiler adds a little overhead
    to the wall time, none to the products."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(seed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        trainer.step(batch)
        wall = time.perf_counter() - start
    products = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_OPS) / 1e6
    return wall, products


def sizes_of(args):
    sizes = dict(QUICK if args.quick else FULL)
    if args.batch:
        sizes["batch"] = args.batch
    return sizes


def run_model(name, args):
    """Ours and the reference-style step of one model in this process; returns a result dict."""
    from benchmarks.reference_style import reference_step_for
    from models import create_model

    sizes = sizes_of(args)
    torch.manual_seed(args.seed)
    model = create_model(name, **model_config(name, sizes))
    on_cpu = torch.device(args.device).type == "cpu"
    # The reference-style steps are CPU code: on another device ours runs alone.
    reference = reference_step_for(model, LR) if on_cpu else None  # copies the weights first
    ours = Ours(model.to(args.device), LR, device=args.device)
    # a fresh batch for every step, as in training (the same one for both implementations): ours
    # skips captions whose hinge gives no gradient, and a batch repeated would be partly learned
    rng = np.random.default_rng(args.seed)
    new_batch = lambda: make_batch(model, sizes, rng, args.words_mean, args.words_std)
    batch = new_batch()
    result = {
        "model": name,
        "batch": sizes["batch"],
        "embed": sizes["embed"][name],
        "quick": args.quick,
        "device": args.device,
    }
    # warm-up step of each from identical weights and seed: the losses must agree
    _, _, loss_ours, norm_ours = timed(ours, batch, args.seed)
    result["rss_ours_gib"], result["loss_ours"] = peak_rss_gib(), loss_ours
    trainers = {"ours": ours}
    if reference is not None:
        trainers["ref"] = reference
        _, _, loss_ref, norm_ref = timed(reference, batch, args.seed)
        result["rss_ref_gib"] = peak_rss_gib()
        result.update(
            loss_ref=loss_ref,
            loss_diff=abs(loss_ours - loss_ref),
            grad_norm_rel_diff=abs(norm_ours - norm_ref) / max(norm_ref, 1e-12),
        )
    runs = {key: [] for key in trainers}
    for run in range(args.runs):  # alternate, so a slow spell of the machine hits both
        batch = new_batch()
        for key, trainer in trainers.items():
            runs[key].append(timed(trainer, batch, args.seed + 1 + run)[:2])
    for key in runs:
        result[key + "_s"] = statistics.median(wall for wall, _ in runs[key])
        result[key + "_cpu_s"] = statistics.median(cpu for _, cpu in runs[key])
        result[key + "_runs"] = runs[key]
    result["rss_end_gib"] = peak_rss_gib()
    if torch.device(args.device).type == "cuda":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["rows_with_gradient"] = rows_with_gradient(ours, new_batch())
    if args.products:  # ours only: the profiler's per-op cost would swamp the reference's small ops
        result["ours_profiled_s"], result["ours_products_s"] = product_seconds(ours, new_batch(), args.seed)
    return result


def rows_with_gradient(trainer, batch):
    """Share of the captions of each pass (anchor, T3, T4) whose representation gets a nonzero
    gradient in one more step of `trainer` on a fresh batch (not timed). Our backward skips the
    others (accel/linear.py, the GRU's sub-layout), so the step's cost depends on it; the
    reference's does not."""
    model, shares = trainer.model, []
    encode = model.encode_captions

    def watched(ids, lengths):
        out = encode(ids, lengths)
        rep = out[0] if isinstance(out, tuple) else out
        if rep.requires_grad:
            slot = len(shares)
            shares.append(None)
            rep.register_hook(
                lambda g: shares.__setitem__(slot, float(g.flatten(1).ne(0).any(1).float().mean()))
            )
        return out

    model.encode_captions = watched
    try:
        trainer.step(batch)
    finally:
        del model.encode_captions
    return shares


def products_line(r):
    """Where our time goes: matrix products against everything else."""
    if "ours_products_s" not in r:
        return ""
    products, wall = r["ours_products_s"], r["ours_profiled_s"]
    return (
        f"\n    one profiled step of ours: matrix products {products:.3g} s, everything else "
        f"{wall - products:.3g} s; if everything but these products were free, the speedup "
        f"would be {r['ref_s'] / products:.1f}x"
    )


def report_line(r):
    if "ref_s" not in r:  # ours alone, on a GPU
        memory = f"peak GPU memory {r['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in r else ""
        return (
            f"{r['model']}+adapoffquin on {r['device']}  ours {r['ours_s']:.3g} s  "
            f"loss {r['loss_ours']:.6g}  {memory}" + gradient_rows_line(r)
        )
    op, target = TARGETS[r["model"]]
    ratio = r["ours_s"] / r["ref_s"]
    speedup = r["ref_s"] / r["ours_s"]
    return (
        f"{r['model']}+adapoffquin  ours {r['ours_s']:.3g} s  reference {r['ref_s']:.3g} s  "
        f"ratio {ratio:.2f} ({speedup:.1f}x faster; target ratio {op} {target})  "
        f"[process CPU time, all threads: ours {r['ours_cpu_s']:.3g} s, reference {r['ref_cpu_s']:.3g} s]  "
        f"loss ours {r['loss_ours']:.6g} ref {r['loss_ref']:.6g} |diff| {r['loss_diff']:.2e}  "
        f"grad-norm rel diff {r['grad_norm_rel_diff']:.1e}  "
        f"peak RSS after ours {r['rss_ours_gib']:.2f} GiB, after reference {r['rss_ref_gib']:.2f} GiB"
        + gradient_rows_line(r)
        + products_line(r)
    )


def gradient_rows_line(r):
    shares = r.get("rows_with_gradient")
    if not shares or None in shares:
        return ""
    # VSRN's anchor pass calls its text encoder directly: its two watched passes are T3 and T4
    names = {3: ["anchor", "T3", "T4"], 2: ["T3", "T4"]}.get(
        len(shares), [str(i) for i in range(len(shares))]
    )
    return "\n    captions with a gradient (ours skips the others in the backward): " + ", ".join(
        f"{n} {share:.0%}" for n, share in zip(names, shares)
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of vsrn,scan,bfan")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--batch", type=int, help="override the batch size (e.g. 32 to profile)")
    p.add_argument("--runs", type=int, default=3, help="timed steps per implementation (median)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--products",
        action="store_true",
        help="also profile one step of each and report the time inside matrix products",
    )
    p.add_argument("--words-mean", type=float, default=10.5, help="caption words (without <start>/<end>)")
    p.add_argument("--words-std", type=float, default=2.4)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]: where our step runs")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.products and torch.device(args.device).type != "cpu":
        p.error("--products profiles CPU kernels: use it with --device cpu")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_model(args.child, args)))
        return
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {MODELS}")
    sizes = sizes_of(args)
    print(
        f"{'QUICK ' if args.quick else ''}B={sizes['batch']} 36x{sizes['img_dim']} vocab {sizes['vocab']}, "
        f"{args.threads} threads, median of {args.runs} after one warm-up, on {args.device}",
        flush=True,
    )
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = []
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, *forwarded, "--child", name], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(report_line(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "threads": args.threads, "models": results}))


if __name__ == "__main__":
    main()
