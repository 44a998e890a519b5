"""Train a matching model with the baseline (online triplet) loss or an AOQ variant.

Inputs:  the precomp folder (features), the prepared folder (ids, manifest), for AOQ variants the
         offline candidate files i2t / t2i.
Outputs: `--out-best` (best dev checkpoint by i2t R@1+R@5 + t2i R@1+R@5), `--out-last`, and
         `--out-log` (one CSV row per validation). Each validation also logs one line starting
         with `VAL `. Resume state lives in `--resume-dir`, outside the declared outputs (Snakemake
         deletes those when a job fails): a rerun after a kill continues from the last validation.

Several processes (one per GPU) train one model on shards of the same global batches when launched
by torchrun or srun; the step computes what the single process computes, and rank 0 alone
validates and writes (pipeline_steps/training/distributed.py):
    python -m torch.distributed.run --nproc_per_node 4 -m pipeline_steps.train ...

Example:
    python -m pipeline_steps.train --data results/demo_data/demo_precomp \
        --prepared results/prepared/demo_precomp --model vsepp \
        --model-config '{"embed_size": 256}' --train-config '{"epochs": 2}' \
        --loss-config '{"variant": "baseline"}' --seed 0 --out-best best.pt --out-last last.pt \
        --out-log val.csv --resume-dir /tmp/resume

`--tensorboard-dir DIR` also logs the losses, learning rate and validation metrics to TensorBoard
(pipeline_steps/training/tensorboard.py); it changes nothing else of the run.
"""

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import accel
from models import create_model
from models.losses import LossConfig, OfflineScores, adaptive_weights, retrieval_loss
from models.variants import VARIANTS
from pipeline_steps.common.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.device import set_tf32
from pipeline_steps.common.errors import InputError, one_line_errors
from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches
from pipeline_steps.data.splits import open_split, read_manifest
from pipeline_steps.retrieval.encode import encode_split
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS, evaluate, val_score4
from pipeline_steps.retrieval.scorers import representation_scorer
from pipeline_steps.training import distributed
from pipeline_steps.training.checkpoint import save_checkpoint, warm_start
from pipeline_steps.training.optim import Optimizers
from pipeline_steps.training.precision import MixedPrecision
from pipeline_steps.training.resume import FolderInUse, ResumeFolder, best_name
from pipeline_steps.training.tensorboard import open_board

log = logging.getLogger("train")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 2e-4
    lr_update: int = 15  # lr x0.1 every lr_update epochs
    grad_clip: float = 2.0  # total-norm clip; <= 0 disables
    val_step: int = 500  # also validate every val_step iterations
    offline_size: int = 300  # offline negatives drawn from the top offline_size candidates
    eval_batch_size: int = 256
    workers: int = 0
    allow_tf32: bool = False  # the reference ran in full fp32 (Q-TF32); True is faster on GPUs
    amp: str = "none"  # none | bf16 | fp16 autocast of forward and loss (common/precision.py)
    # Epochs at the start that sum the online hinge over all in-batch negatives (VSE0) instead of
    # taking the hardest one. 0 = the reference. From random init on weak features the hardest
    # negative can collapse every embedding onto one point; a warm-up epoch (as VSE-infinity's
    # `vse_mean_warmup_epochs`) avoids that. AdapOffQuin's weights need the hardest negative, so
    # its warm-up runs as OffQuin.
    max_violation_warmup_epochs: int = 0
    # Adam's update as PyTorch 0.4.1, which the releases ran, computed it (eps added before v's
    # bias correction; docs/reference_behaviours.md Q-ADAM041). False: today's torch.optim.Adam.
    release_adam: bool = True


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--model-config", default="{}", help="JSON: model config fields")
    p.add_argument("--train-config", default="{}", help="JSON: TrainConfig fields")
    p.add_argument("--loss-config", default="{}", help="JSON: LossConfig fields")
    p.add_argument("--candidates-i2t")
    p.add_argument("--candidates-t2i")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="auto",
        help="auto | cpu | cuda[:k]; under torchrun/srun, auto and cuda mean this process's GPU",
    )
    p.add_argument(
        "--distributed",
        choices=["auto", "off"],
        default="auto",
        help="auto: join the process group of a torchrun or srun launch, if any",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out-best", required=True)
    p.add_argument("--out-last", required=True)
    p.add_argument("--out-log", required=True)
    p.add_argument("--resume-dir", required=True)
    p.add_argument("--init-from", help="start from this checkpoint's weights (a later mining round)")
    p.add_argument("--tensorboard-dir", help="also log scalars here for TensorBoard (off by default)")
    return p.parse_args(argv)


def _json_config(text, cls, what):
    try:
        return cls(**json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        known = ", ".join(f.name for f in fields(cls))  # both configs are dataclasses
        raise SystemExit(f"error: bad {what}: {err} (known fields: {known})") from None


def fingerprint(args):
    """What makes two runs the same run; resume state from a different run is not reused.

    The arguments, and the identity (size, modification time) of the files behind them: data
    prepared again (another vocabulary) or candidates mined again keep their paths but make
    another run."""
    keys = [
        "data",
        "prepared",
        "model",
        "model_config",
        "train_config",
        "loss_config",
        "candidates_i2t",
        "candidates_t2i",
        "seed",
    ]
    inputs = [
        Path(args.data) / "train_ims.npy",
        Path(args.prepared) / "manifest.json",
        Path(args.prepared) / "train_ids.npz",
        args.candidates_i2t,
        args.candidates_t2i,
    ]
    stats = {str(f): os.stat(f) for f in inputs if f and os.path.exists(f)}
    identity = {name: [st.st_size, st.st_mtime_ns] for name, st in stats.items()}
    text = json.dumps({"args": {k: getattr(args, k) for k in keys}, "files": identity}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def loss_config_at_epoch(loss_cfg, cfg, epoch):
    """The loss of `epoch`: during the warm-up, summed over every negative (no hardest one)."""
    return loss_cfg if epoch >= cfg.max_violation_warmup_epochs else loss_cfg.summed_over_negatives()


def lr_at_epoch(cfg, epoch):
    return cfg.learning_rate * 0.1 ** (epoch // cfg.lr_update)


def training_loss(model, batch, loss_cfg, device, ctx=distributed.SINGLE, stats=None):
    """Loss of one batch: anchor pass, then (AOQ) the I3/T3 and I4/T4 passes in that order.

    The order matters for models with BatchNorm: each train-mode pass updates the running
    statistics, anchor first (docs/method.md). In a multi-process run `batch` is this process's shard:
    `ctx` completes the representations and offline scores with the other shards' (without their
    gradients) and the auxiliary loss, a per-sample mean, with theirs, so the loss is the whole
    batch's.

    `stats`, a dict or None, receives what the logs show besides the loss terms: the mean adaptive
    weight of an AdapOffQuin loss.
    """
    img, cap, aux = model.anchor_forward(batch, device)
    offline = None
    if loss_cfg.needs_offline:
        with model.offline_pass():
            img3 = model.encode_images(batch["neg_images"].to(device))
            cap3 = model.encode_captions(batch["neg_ids"].to(device), batch["neg_lengths"])
            img4 = model.encode_images(batch["pos2_images"].to(device))
            cap4 = model.encode_captions(batch["pos2_ids"].to(device), batch["pos2_lengths"])
        paired = dict(
            off_t=model.score_paired(img, cap3),
            off_i=model.score_paired(img3, cap),
            quin_a=model.score_paired(img3, cap3),
            quin_b=model.score_paired(img4, cap4),
        )
        offline = OfflineScores(**{name: ctx.whole_batch(score) for name, score in paired.items()})
    img = ctx.whole_batch(img, model.concat_representations)
    cap = ctx.whole_batch(cap, model.concat_representations)
    scores = model.training_scores(img, cap, few_gradients=loss_cfg.max_violation)
    loss, terms = retrieval_loss(scores, offline, loss_cfg)
    if stats is not None and VARIANTS[loss_cfg.variant].adaptive:
        with torch.no_grad():
            stats["adaptive_weight_mean"] = torch.cat(adaptive_weights(scores, offline, loss_cfg)).mean()
    if aux is not None:
        aux = ctx.batch_mean(aux, len(batch["index"]))
        loss = loss + aux
        terms["auxiliary"] = aux.detach()
    return loss, terms


def validate(model, dev, cfg, device):
    features, captions, info = dev
    imgs, caps = encode_split(model, features, captions, info.n_captions, cfg.eval_batch_size, device)
    metrics = evaluate(representation_scorer(model, imgs, caps, info.n_images), "full")
    model.train()
    return metrics


class Run:
    """Training state that a resume restores: weights, optimiser, position, best score, history.
    Rank 0 holds the resume folder's lock and alone writes it (with every process's random
    state); every process restores from it (pipeline_steps/training/resume.py)."""

    def __init__(self, args, model, optimizer, resume_dir, ctx=distributed.SINGLE):
        self.args, self.model, self.optimizer, self.ctx = args, model, optimizer, ctx
        self.folder = ResumeFolder(resume_dir)
        self.dir = self.folder.path
        self.epoch, self.next_batch, self.iteration = 0, 0, 0
        self.best_score, self.best_iteration, self.history = float("-inf"), None, []
        self.saved_iteration = None  # the iteration of the resume state on disk
        self.fingerprint = fingerprint(args)
        self.state = None  # the resume state rank 0 found usable

    def take_folder(self):
        """Rank 0 locks the resume folder and drops a state that is not complete; every process
        stops with the same one-line error if another trainer holds it."""
        problem = None
        if self.ctx.is_main:
            try:
                self.folder.lock()
            except FolderInUse as err:
                problem = str(err)
            else:
                self.state = self.folder.load_state(self.fingerprint)  # discards an unusable one
                if self.state is not None and not self._fits(self.state):
                    log.warning("resume state in %s does not fit this model; training starts over", self.dir)
                    self.folder.discard()
                    self.state = None
        problem = next((p for p in self.ctx.gather_objects(problem) if p), None)
        if problem:
            raise SystemExit(f"error: {problem}")
        self.ctx.barrier()

    def _fits(self, state):
        """Whether the saved weights have this model's names and shapes (load_state_dict would
        copy what fits before it refused the rest)."""
        own = self.model.state_dict()
        saved = state.get("model", {})
        return saved.keys() == own.keys() and all(saved[k].shape == own[k].shape for k in own)

    def try_resume(self):
        """Restore the state rank 0 validated (the others read it after rank 0 kept it)."""
        state = self.state if self.ctx.is_main else self.folder.read_state()
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if self.ctx.enabled:
            self.ctx.restore_rng(state.get("rank_rng"), self.args.seed, state["iteration"])
        elif state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch, self.next_batch = state["epoch"], state["next_batch"]
        self.iteration, self.best_score = state["iteration"], state["best_score"]
        self.best_iteration, self.history = state["best_iteration"], state["history"]
        self.saved_iteration = self.iteration
        log.info("resuming at epoch %d batch %d (iteration %d)", self.epoch, self.next_batch, self.iteration)
        return True

    def save_state(self):
        """Called by every process (it gathers their random states); rank 0 writes."""
        rank_rng = self.ctx.gather_objects(self.ctx.rng_state()) if self.ctx.enabled else None
        if self.ctx.is_main:
            cuda_all = torch.cuda.is_available() and not self.ctx.enabled  # a process touches its GPU only
            self.folder.save_state(
                {
                    "fingerprint": self.fingerprint,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if cuda_all else [],
                    "rank_rng": rank_rng,
                    "epoch": self.epoch,
                    "next_batch": self.next_batch,
                    "iteration": self.iteration,
                    "best_score": self.best_score,
                    "best_iteration": self.best_iteration,
                    "history": self.history,
                }
            )
        self.saved_iteration = self.iteration
        self.ctx.barrier()

    def checkpoint(self, path, metrics):
        save_checkpoint(
            path,
            self.model,
            epoch=self.epoch,
            iteration=self.iteration,
            val_score4=val_score4(metrics),
            metrics=metrics,
            seed=self.args.seed,
            train_config=self.args.train_config,
            loss_config=self.args.loss_config,
            **vocabulary_of(self.args.prepared),
        )

    @property
    def best_path(self):
        return self.dir / best_name(self.best_iteration)


def vocabulary_of(prepared):
    """The prepared vocabulary's digest, which a checkpoint records (where the manifest has it)."""
    digest = read_manifest(prepared).get("vocab_sha256")
    return {"vocab_sha256": digest} if digest else {}


def run_validation(run, dev, cfg, device, train_loss, lr, label):
    """Validate, keep a new best checkpoint, log the row; returns the metrics and val_score4."""
    metrics = validate(run.model, dev, cfg, device)
    score = val_score4(metrics)
    is_best = score > run.best_score  # strictly greater, as the reference
    if is_best:
        run.best_score, run.best_iteration = score, run.iteration
        run.checkpoint(run.best_path, metrics)  # a new name: the saved state still names the old one
    row = {
        "epoch": run.epoch,
        "iteration": run.iteration,
        "lr": lr,
        "train_loss": train_loss,
        **{k: round(metrics[k], 4) for k in RECALL_COLUMNS},
        "val_score4": round(score, 4),
        "best": int(is_best),
    }
    run.history.append(row)
    log.info(
        "VAL %s epoch=%d iter=%d lr=%.3g train_loss=%.4f %s val_score4=%.2f best=%d",
        label,
        run.epoch,
        run.iteration,
        lr,
        train_loss,
        " ".join(f"{k}={metrics[k]:.2f}" for k in RECALL_COLUMNS),
        score,
        int(is_best),
    )
    return metrics | {"val_score4": score}


class NonFinite(Exception):
    """A loss or gradient was NaN or Inf."""


def check_finite(what, value, label, run):
    """Stop at once on a NaN/Inf, naming the run and the step. The resume state of the last
    validation stays, so a rerun replays the same steps and stops the same way."""
    if not math.isfinite(value):
        kept = (
            "no resume state yet"
            if run.saved_iteration is None
            else f"the resume state of iteration {run.saved_iteration} is kept in {run.dir}"
        )
        raise NonFinite(
            f"non-finite {what} ({value}) at {label} epoch={run.epoch} "
            f"iteration={run.iteration + 1}; training stopped, {kept}"
        )


def history_csv(history):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def write_outputs(run, args):
    last_metrics = run.history[-1]
    run.checkpoint(args.out_last, {k: last_metrics[k] for k in RECALL_COLUMNS})
    with atomic_path(args.out_best) as tmp:
        shutil.copyfile(run.best_path, tmp)
    write_text_atomic(args.out_log, history_csv(run.history))
    run.folder.remove()  # finished: a forced rerun starts from scratch
    log.info("done: best val_score4=%.2f", run.best_score)


def build(args, cfg, loss_cfg, ctx):
    """Data, model, offline candidates, optimiser and precision of a run."""
    features, captions, info = open_split(args.data, args.prepared, "train")
    dev = open_split(args.data, args.prepared, "dev")
    ctx.check_batch_split(info.n_captions, cfg.batch_size)
    vocab_size = read_manifest(args.prepared)["vocab_size"]
    model_cfg = json.loads(args.model_config) | {"vocab_size": vocab_size, "img_dim": info.img_dim}
    try:
        model = create_model(args.model, **model_cfg).to(ctx.device)
    except (TypeError, ValueError) as err:  # an unknown field or value of the model's config
        raise InputError(f"--model {args.model} --model-config: {err}") from None
    ctx.prepare_model(model, args.seed)  # multi-process: whole-batch BatchNorm, own dropout streams
    candidates = None
    if loss_cfg.needs_offline:
        candidates = OfflineCandidates(
            args.candidates_i2t, args.candidates_t2i, info.n_images, cfg.offline_size
        )
    set_tf32(cfg.allow_tf32)
    try:
        precision = MixedPrecision(cfg.amp, ctx.device)
    except ValueError as err:
        raise SystemExit(f"error: --train-config: {err}") from None
    optimizer = Optimizers(model, cfg.learning_rate, cfg.release_adam)
    return (features, captions, info), dev, model, candidates, optimizer, precision


def train_epochs(run, train_split, dev, candidates, cfg, loss_cfg, precision, label, board):
    """The loop: epochs of batches, a validation every val_step iterations and at each epoch's
    end, the resume state saved after each validation. `board` logs scalars (TensorBoard)."""
    features, captions, info = train_split
    model, optimizer, ctx, seed = run.model, run.optimizer, run.ctx, run.args.seed
    caption_targets = model.caption_targets_of if model.needs_caption_targets else None
    model.train()
    while run.epoch < cfg.epochs:
        lr = lr_at_epoch(cfg, run.epoch)
        optimizer.set_lr(lr)
        epoch_loss = loss_config_at_epoch(loss_cfg, cfg, run.epoch)
        batches = epoch_batches(info.n_captions, cfg.batch_size, seed, run.epoch)
        dataset = TrainBatches(
            features,
            captions,
            batches,
            seed,
            run.epoch,
            candidates,
            first_batch=run.next_batch,
            caption_targets=caption_targets,
            shard=(ctx.rank, ctx.world_size),
        )
        # Its own generator: creating a loader must not draw from the global RNG (dropout), or a
        # resumed run, which creates one mid-epoch, would diverge from an uninterrupted one.
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=cfg.workers, generator=torch.Generator().manual_seed(seed)
        )
        losses = []
        bar = tqdm(
            loader,
            desc=f"epoch {run.epoch}",
            initial=run.next_batch,
            total=len(batches),
            mininterval=5,
            file=sys.stderr,
            disable=not ctx.is_main,
        )
        for batch in bar:
            stats = {} if board.active else None
            with precision.autocast():
                loss, terms = training_loss(model, batch, epoch_loss, ctx.device, ctx, stats=stats)
            losses.append(loss.item())
            check_finite("loss", losses[-1], label, run)
            optimizer.zero_grad()
            precision.backward(loss)
            precision.unscale(optimizer)
            ctx.sum_gradients(model.parameters())  # before clipping: the total norm is the batch's
            total_norm = optimizer.clip(cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            if not precision.skips_overflow:  # fp16's scaler skips such steps by design
                check_finite("gradient norm", total_norm, label, run)
            if precision.should_step(total_norm):
                optimizer.step()
            run.iteration += 1
            run.next_batch += 1
            board.training_step(run.iteration, losses[-1], terms, stats, lr)
            if run.iteration % cfg.val_step == 0 and run.next_batch < len(batches):
                if ctx.is_main:  # the others wait in save_state
                    metrics = run_validation(run, dev, cfg, ctx.device, float(np.mean(losses)), lr, label)
                    board.validation(run.iteration, metrics)
                losses = []
                run.save_state()
        bar.close()
        if ctx.is_main:
            mean_loss = float(np.mean(losses)) if losses else float("nan")
            board.validation(run.iteration, run_validation(run, dev, cfg, ctx.device, mean_loss, lr, label))
        run.epoch, run.next_batch = run.epoch + 1, 0
        run.save_state()


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    cfg = _json_config(args.train_config, TrainConfig, "--train-config")
    loss_cfg = _json_config(args.loss_config, LossConfig, "--loss-config")
    if loss_cfg.needs_offline and not (args.candidates_i2t and args.candidates_t2i):
        raise SystemExit(
            f"error: loss variant {loss_cfg.variant!r} needs --candidates-i2t and --candidates-t2i"
        )
    ctx = distributed.setup(args.device, enabled=args.distributed == "auto")
    prefix = f"[rank {ctx.rank}] " if ctx.enabled else ""
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format=f"%(asctime)s {prefix}%(name)s %(message)s",
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log.info("accelerated paths: %s", accel.summary())
    train_split, dev, model, candidates, optimizer, precision = build(args, cfg, loss_cfg, ctx)
    if args.init_from:
        warm_start(model, args.init_from)  # a resumed run then continues from its own state

    run = Run(args, model, optimizer, args.resume_dir, ctx)
    run.take_folder()  # one trainer per resume folder; an incomplete state is dropped
    try:
        if ctx.is_main:  # only now is nothing else writing these
            remove_stale_temporaries(args.out_best, args.out_last, args.out_log)
        run.try_resume()
        ctx.agree("where training resumes", (run.epoch, run.next_batch, run.iteration))
        ctx.broadcast_from_main(model.state_dict().values())
        label = f"model={args.model} variant={loss_cfg.variant} seed={args.seed}"
        board = open_board(args.tensorboard_dir if ctx.is_main else None, run.iteration)
        try:
            train_epochs(run, train_split, dev, candidates, cfg, loss_cfg, precision, label, board)
        except NonFinite as err:
            raise SystemExit(f"error: {err}") from None
        finally:
            board.close()
        if ctx.is_main:
            write_outputs(run, args)
    finally:
        run.folder.unlock()  # the process may live on (tests, notebooks): let the next one in
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
