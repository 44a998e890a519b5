"""Evaluate one model or an ensemble on a test split: R@1/5/10, medr, meanr both ways, rsum.

Input:  one or more checkpoints (several = an ensemble scored with the mean of their similarity
        matrices), the precomp and prepared folders.
Output: per evaluation, a flat metrics JSON (docs/evaluation.md): i2t_r1 ... t2i_meanr, rsum, plus
        `evaluation`, `protocol`, `split`, `models` and, for 5-fold, `folds` (the per-fold rows).
        Several evaluations in one call share the encoding of their split. Beside each JSON,
        <name>.ranks.npz holds the per-query ranks (i2t: one per image, t2i: one per caption,
        0-based, within the fold for 5-fold) that the report's paired bootstrap resamples. The
        JSON also records each model's weights digest and the run's provenance (commit, settings
        digest, versions, device, tokenizer).
Protocols: `full` = every image against every caption of the split (Flickr30K 1K on `test`,
COCO 5K on `testall`); `5fold` = COCO 1K: 5 folds of consecutive images of `testall`, each metric
averaged over folds, rsum = sum of the six mean recalls.

Example:
    python -m pipeline_steps.evaluate --checkpoints a/model_best.pt b/model_best.pt \
        --data results/demo_data/demo_precomp --prepared results/prepared/demo_precomp \
        --evaluation coco_1k testall 5fold results/eval/x/coco_1k.json \
        --evaluation coco_5k testall full results/eval/x/coco_5k.json
"""

import argparse
import json
import logging
import sys

import numpy as np

import accel
from pipeline_steps.common.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.device import pick_device, set_tf32
from pipeline_steps.common.errors import InputError, one_line_errors
from pipeline_steps.common.provenance import provenance, weights_digest
from pipeline_steps.data.splits import open_split, read_manifest
from pipeline_steps.retrieval.encode import encode_split
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS, evaluate_with_ranks, ranks_path
from pipeline_steps.retrieval.scorers import ensemble_scorer, representation_scorer
from pipeline_steps.training.checkpoint import load_checkpoint

log = logging.getLogger("evaluate")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", nargs="+", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--label", default=None, help="what is evaluated, for the report (default: model names)")
    p.add_argument(
        "--evaluation",
        nargs=4,
        action="append",
        required=True,
        metavar=("NAME", "SPLIT", "PROTOCOL", "OUT"),
        help="one evaluation: its name, split, protocol (full | 5fold) and output JSON",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--settings", default=None, help="digest of the settings behind the checkpoints")
    return p.parse_args(argv)


def write_ranks(path, i2t, t2i):
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, i2t=np.asarray(i2t, dtype=np.int32), t2i=np.asarray(t2i, dtype=np.int32))


def check_vocabulary(path, checkpoint, prepared):
    """The checkpoint must have been trained on the prepared data's vocabulary: with other word
    ids the metrics are wrong (a larger vocabulary) or the lookup fails (a smaller one)."""
    manifest = read_manifest(prepared)
    size = checkpoint["model_config"].get("vocab_size")
    if size is not None and size != manifest["vocab_size"]:
        raise InputError(
            f"{path}: trained with a vocabulary of {size} words, but {prepared} holds "
            f"{manifest['vocab_size']}: prepare the data with the checkpoint's vocabulary"
        )
    ours, theirs = checkpoint.get("vocab_sha256"), manifest.get("vocab_sha256")
    if ours and theirs and ours != theirs:
        raise InputError(
            f"{path}: trained with another vocabulary of the same size (vocab.json sha256 "
            f"{ours[:12]}, {prepared}: {theirs[:12]}): prepare the data with the checkpoint's vocabulary"
        )


def score_split(checkpoints, data, prepared, split, batch_size, device):
    """Encode `split` with every model; return (ensemble scorer, n_images, model descriptions)."""
    features, captions, info = open_split(data, prepared, split)
    scorers, models = [], []
    for path in checkpoints:
        model, checkpoint = load_checkpoint(path, device)
        check_vocabulary(path, checkpoint, prepared)
        images, caps = encode_split(model, features, captions, info.n_captions, batch_size, device)
        scorers.append(representation_scorer(model, images, caps, info.n_images))
        loss_config = json.loads(checkpoint.get("loss_config", "{}"))
        models.append(
            {
                "checkpoint": str(path),
                "model": model.name,
                "variant": loss_config.get("variant", "baseline"),
                "seed": checkpoint.get("seed"),
                "epoch": checkpoint.get("epoch"),
                "iteration": checkpoint.get("iteration"),
                "weights_sha256": weights_digest(model),
                "loss_config": loss_config,
                "train_config": json.loads(checkpoint.get("train_config", "{}")),
            }
        )
    scorer = scorers[0] if len(scorers) == 1 else ensemble_scorer(scorers)
    return scorer, info.n_images, models


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    remove_stale_temporaries(*(e[3] for e in args.evaluation), *(ranks_path(e[3]) for e in args.evaluation))
    for name, _, protocol, _ in args.evaluation:
        if protocol not in ("full", "5fold"):
            raise SystemExit(f"error: evaluation {name}: protocol must be full or 5fold, not {protocol!r}")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    set_tf32(False)  # full fp32, as the reference
    log.info("accelerated paths: %s", accel.summary())
    origin = provenance(device, args.settings, read_manifest(args.prepared).get("tokenizer"))
    for split in dict.fromkeys(e[1] for e in args.evaluation):
        scorer, n_images, models = score_split(
            args.checkpoints, args.data, args.prepared, split, args.batch_size, device
        )
        for name, _, protocol, out in (e for e in args.evaluation if e[1] == split):
            try:
                metrics, i2t, t2i = evaluate_with_ranks(scorer, protocol)
            except ValueError as err:
                raise SystemExit(f"error: evaluation {name} on split {split}: {err}") from None
            label = args.label or "+".join(dict.fromkeys(m["model"] for m in models))
            result = {
                **metrics,
                "evaluation": name,
                "label": label,
                "protocol": protocol,
                "split": split,
                "models": models,
                "provenance": origin,
            }
            write_ranks(ranks_path(out), i2t, t2i)
            write_text_atomic(out, json.dumps(result, indent=2))
            log.info(
                "EVAL %s split=%s protocol=%s models=%d %s",
                name,
                split,
                protocol,
                len(models),
                " ".join(f"{k}={metrics[k]:.2f}" for k in RECALL_COLUMNS),
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
