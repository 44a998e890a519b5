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

This file reads as parse -> build -> loop -> outputs. The parts: the settings (training/config.py),
the training step and schedule (training/step.py), the optimisers (training/optim.py), the resume
state (training/run.py beside training/resume.py), validation and outputs (training/validation.py).
"""

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import accel
from models import create_model
from models.losses import LossConfig
from pipeline_steps.common.atomic import remove_stale_temporaries
from pipeline_steps.common.device import set_tf32
from pipeline_steps.common.errors import InputError, one_line_errors
from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches
from pipeline_steps.data.splits import open_split, read_manifest
from pipeline_steps.training import distributed
from pipeline_steps.training.checkpoint import warm_start
from pipeline_steps.training.config import TrainConfig, json_config
from pipeline_steps.training.optim import Optimizers
from pipeline_steps.training.precision import MixedPrecision
from pipeline_steps.training.run import Run
from pipeline_steps.training.step import loss_config_at_epoch, lr_at_epoch, training_loss
from pipeline_steps.training.tensorboard import open_board
from pipeline_steps.training.validation import NonFinite, check_finite, run_validation, write_outputs

log = logging.getLogger("train")


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


@dataclass
class Training:
    """What the loop works on: the run's resume state (with model and optimiser), the data, the
    settings, the precision, the run's name in the logs and the TensorBoard writer."""

    run: Run
    train_split: tuple  # (features, captions, SplitInfo) of the training split
    dev: tuple  # the same of the dev split
    candidates: OfflineCandidates | None
    cfg: TrainConfig
    loss_cfg: LossConfig
    precision: MixedPrecision
    label: str  # model=... variant=... seed=...
    board: object  # training/tensorboard.py: logs scalars, or does nothing


def train_epochs(job):
    """The loop: epochs of batches, a validation every val_step iterations and at each epoch's
    end, the resume state saved after each validation."""
    run, dev, cfg, label, board, precision = job.run, job.dev, job.cfg, job.label, job.board, job.precision
    features, captions, info = job.train_split
    model, optimizer, ctx, seed = run.model, run.optimizer, run.ctx, run.args.seed
    caption_targets = model.caption_targets_of if model.needs_caption_targets else None
    model.train()
    while run.epoch < cfg.epochs:
        lr = lr_at_epoch(cfg, run.epoch)
        optimizer.set_lr(lr)
        epoch_loss = loss_config_at_epoch(job.loss_cfg, cfg, run.epoch)
        batches = epoch_batches(info.n_captions, cfg.batch_size, seed, run.epoch)
        dataset = TrainBatches(
            features,
            captions,
            batches,
            seed,
            run.epoch,
            job.candidates,
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
    cfg = json_config(args.train_config, TrainConfig, "--train-config")
    loss_cfg = json_config(args.loss_config, LossConfig, "--loss-config")
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
            train_epochs(Training(run, train_split, dev, candidates, cfg, loss_cfg, precision, label, board))
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
