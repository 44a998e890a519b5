"""One row per metrics JSON written by `evaluate`: what was evaluated, its metrics, its checkpoints
and its provenance (the report's CSV)."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from models.variants import VARIANT_LABELS
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS, ranks_path

RANK_COLUMNS = ["i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"]
PROVENANCE_COLUMNS = ["git_commit", "git_dirty", "settings_digest", "torch", "numpy", "device", "tokenizer"]


def _joined(values):
    return ";".join("" if v is None else str(v) for v in values)


def subset_of(models):
    """seed<k> for one seed (of every member), ensemble for several, released without seeds."""
    seeds = {m.get("seed") for m in models}
    if None in seeds:
        return "released"
    return f"seed{seeds.pop()}" if len(seeds) == 1 else "ensemble"


def warmup_ended(model):
    """False when the checkpoint was selected during the warm-up epochs (summed hinge)."""
    warmup = model.get("train_config", {}).get("max_violation_warmup_epochs", 0)
    return model.get("epoch") is None or model["epoch"] >= warmup


def method_of(path, variant):
    """The training method of an evaluation: its loss variant, or a later mining round's
    <variant>_round<r>, which only the evaluation's folder (eval/<name>/<method>/<subset>/) names:
    a round trains with the same loss."""
    folder = Path(path).parent.parent.name
    return folder if re.fullmatch(rf"{re.escape(variant)}_round\d+", folder) else variant


def metrics_row(path):
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    models = result["models"]
    variants = {m["variant"] for m in models}
    variant = method_of(path, variants.pop()) if len(variants) == 1 else "mixed"
    origin = result.get("provenance", {})
    return {
        "evaluation": result["evaluation"],
        "split": result["split"],
        "protocol": result["protocol"],
        "model": result.get("label", models[0]["model"]),
        "variant": variant,
        "subset": subset_of(models),
        "seeds": _joined(sorted({m.get("seed") for m in models}, key=str)),
        "ensemble_size": len(models),
        **{k: result[k] for k in RECALL_COLUMNS + RANK_COLUMNS},
        "checkpoint_epochs": _joined(m.get("epoch") for m in models),
        "checkpoint_iterations": _joined(m.get("iteration") for m in models),
        "selected_after_warmup": all(warmup_ended(m) for m in models),
        "weights_sha256": _joined(m.get("weights_sha256") for m in models),
        **{k: origin.get(k) for k in PROVENANCE_COLUMNS},
        "metrics_file": str(path),
    }


def metrics_table(paths):
    """Rows of every metrics JSON, ordered by evaluation, model, method (paper order), subset."""
    table = pd.DataFrame([metrics_row(p) for p in paths])
    order = {v: i for i, v in enumerate(VARIANT_LABELS)}
    table["_order"] = table["variant"].map(order).fillna(len(order))
    # seed rows in seed order, then the ensemble row
    table["_subset"] = table["subset"].map(lambda s: int(s[4:]) if s.startswith("seed") else np.inf)
    table = table.sort_values(["evaluation", "model", "_order", "_subset"], kind="stable")
    return table.drop(columns=["_order", "_subset"]).reset_index(drop=True)


def ranks_of(metrics_file):
    """The per-query ranks written beside a metrics JSON."""
    with np.load(ranks_path(metrics_file)) as ranks:
        return ranks["i2t"], ranks["t2i"]
