"""Validation during training: dev metrics with the reference's selection score, the best
checkpoint, one CSV row and one grep-able `VAL` log line per validation; the stop on a NaN or Inf;
the run's outputs once it ends.
"""

import csv
import io
import logging
import math
import shutil

from pipeline_steps.common.atomic import atomic_path, write_text_atomic
from pipeline_steps.retrieval.encode import encode_split
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS, evaluate, val_score4
from pipeline_steps.retrieval.scorers import representation_scorer

log = logging.getLogger("train")


def validate(model, dev, cfg, device):
    features, captions, info = dev
    imgs, caps = encode_split(model, features, captions, info.n_captions, cfg.eval_batch_size, device)
    metrics = evaluate(representation_scorer(model, imgs, caps, info.n_images), "full")
    model.train()
    return metrics


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
