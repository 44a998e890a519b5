"""Statistics over seeds: per (model, method, evaluation) the mean and standard deviation of the
per-seed metrics, and per AOQ method the paired bootstrap interval of its rsum difference from the
baseline of the same seed (pipeline_steps/retrieval/bootstrap.py, docs/evaluation.md#statistics)."""

from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd

from pipeline_steps.reporting.rows import ranks_of
from pipeline_steps.retrieval import bootstrap
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS


@dataclass(frozen=True)
class Bootstrap:
    resamples: int = 10000
    level: float = 0.95
    seed: int = 0


def seed_rows(table):
    return table[table["subset"].str.startswith("seed")]


def seed_summary(table):
    """Mean and standard deviation (n - 1; 0 for one seed) over the seeds of every metric."""
    groups = seed_rows(table).groupby(["evaluation", "model", "variant"], sort=False)
    rows = []
    for (evaluation, model, variant), group in groups:
        row = {"evaluation": evaluation, "model": model, "variant": variant, "n_seeds": len(group)}
        for column in RECALL_COLUMNS:
            values = group[column].to_numpy(dtype=np.float64)
            row[f"{column}_mean"] = values.mean()
            row[f"{column}_std"] = values.std(ddof=1) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


@cache
def _per_image_of(metrics_file):
    return bootstrap.per_image_rsum(*ranks_of(metrics_file))


def _per_image(row):
    """A row's per-image rsum shares; the paired differences and the figure's intervals both use
    them, so each ranks file is read once."""
    return _per_image_of(row["metrics_file"])


def _by_seed(group):
    return {row["seeds"]: row for _, row in group.iterrows()}


def paired_differences(table, settings=Bootstrap()):
    """Per (evaluation, model, AOQ method): rsum minus the same seed's baseline rsum, its mean over
    the seeds both have, the bootstrap interval of that mean (images resampled, seeds pooled by
    averaging each image's difference over seeds) and a verdict."""
    rows = []
    seeds = seed_rows(table)
    for (evaluation, model), group in seeds.groupby(["evaluation", "model"], sort=False):
        baseline = _by_seed(group[group["variant"] == "baseline"])
        for variant, runs in group[group["variant"] != "baseline"].groupby("variant", sort=False):
            paired = [(seed, row) for seed, row in _by_seed(runs).items() if seed in baseline]
            if not paired:
                continue
            diffs = np.mean([_per_image(row) - _per_image(baseline[seed]) for seed, row in paired], axis=0)
            mean, low, high = bootstrap.interval(diffs, settings.resamples, settings.seed, settings.level)
            rows.append(
                {
                    "evaluation": evaluation,
                    "model": model,
                    "variant": variant,
                    "seeds": ",".join(seed for seed, _ in paired),
                    "rsum_difference": mean,
                    "low": low,
                    "high": high,
                    "verdict": bootstrap.verdict(low, high),
                }
            )
    return pd.DataFrame(rows)


def rsum_intervals(table, settings=Bootstrap()):
    """Per (evaluation, model, method): mean rsum over seeds and its bootstrap interval (images
    resampled, each image's share averaged over seeds), for the figure."""
    rows = []
    for (evaluation, model, variant), group in seed_rows(table).groupby(
        ["evaluation", "model", "variant"], sort=False
    ):
        values = np.mean([_per_image(row) for _, row in group.iterrows()], axis=0)
        mean, low, high = bootstrap.interval(values, settings.resamples, settings.seed, settings.level)
        rows.append(
            {
                "evaluation": evaluation,
                "model": model,
                "variant": variant,
                "rsum": mean,
                "low": low,
                "high": high,
                "seed_rsums": group["rsum"].tolist(),
            }
        )
    return pd.DataFrame(rows)


def identical_checkpoints(table):
    """Pairs of rows of one evaluation and model whose checkpoints have the same weights, e.g. two
    methods whose selected checkpoints both come from a warm-up in which they train alike."""
    pairs = []
    for (evaluation, model), group in table.groupby(["evaluation", "model"], sort=False):
        seen = {}
        for _, row in group.iterrows():
            key = row["weights_sha256"]
            if key and key in seen:
                pairs.append((evaluation, model, seen[key], f"{row['variant']} {row['subset']}"))
            else:
                seen[key] = f"{row['variant']} {row['subset']}"
    return pairs
