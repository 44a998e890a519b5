"""A study's table and figure: per row (a level of a config key, or a named factor), AOQ's paired
rsum difference from the baseline (from the row's report/differences.csv) beside the baseline's
mean rsum, how many of the AOQ runs selected a warm-up checkpoint (from report/report.csv), and
the miner's strength: its i2t R@1 on the evaluation and the share of its offline candidates that
score above the anchor's positive (from the round-1 mining audit, docs/mining_audit.md)."""

import json
import math
from pathlib import Path

import pandas as pd

from pipeline_steps.common.errors import InputError
from pipeline_steps.reporting.figures import _pyplot, _save
from pipeline_steps.reporting.tables import method


def _read(path):
    if not Path(path).is_file():
        raise InputError(f"{path}: missing (has this level's Snakemake run finished?)")
    return pd.read_csv(path)


def round1_audit(results_dir):
    """(miner model, seed, audit) of the row's round-1 mining (candidates/<model>/seed<k>/), or
    None where nothing was mined (the authors' candidate files, or no AOQ run)."""
    found = sorted(Path(results_dir).glob("candidates/*/seed*/audit.json"))
    if not found:
        return None
    path = found[0]
    audit = json.loads(path.read_text(encoding="utf-8"))
    return path.parent.parent.name, path.parent.name, audit


def miner_strength(table, evaluation, audit):
    """The miner's i2t R@1 on `evaluation` and its candidates' above-positive shares (NaN: none)."""
    if audit is None:
        return {"miner_i2t_r1": math.nan, "above_positive_i2t": math.nan, "above_positive_t2i": math.nan}
    model, subset, numbers = audit
    miner = table[
        (table["evaluation"] == evaluation)
        & (table["model"] == model)
        & (table["variant"] == "baseline")
        & (table["subset"] == subset)
    ]
    return {
        "miner_i2t_r1": float(miner["i2t_r1"].iloc[0]) if len(miner) else math.nan,
        "above_positive_i2t": numbers["i2t"]["above_positive_share"],
        "above_positive_t2i": numbers["t2i"]["above_positive_share"],
    }


def level_rows(level, results_dir):
    """One row per (evaluation, model, AOQ method) of one row's results (results/<dataset>/)."""
    report_dir = Path(results_dir) / "report"
    differences = _read(report_dir / "differences.csv")
    table = _read(report_dir / "report.csv")
    audit = round1_audit(results_dir)
    per_seed = table[table["subset"].str.startswith("seed")]
    means = per_seed.groupby(["evaluation", "model", "variant"])["rsum"].mean()
    recall = per_seed.groupby(["evaluation", "model", "variant"])["i2t_r1"].mean()
    if differences.empty:  # a baseline-only row: the baselines' recall, no AOQ columns
        return [
            {
                "level": level,
                "evaluation": evaluation,
                "model": model,
                "variant": "baseline",
                "seeds": ",".join(s.removeprefix("seed") for s in runs["subset"]),
                "baseline_rsum": runs["rsum"].mean(),
                "baseline_i2t_r1": runs["i2t_r1"].mean(),
                **dict.fromkeys(("aoq_rsum", "rsum_difference", "low", "high"), math.nan),
                "verdict": "–",
                "warmup_checkpoints": int((~runs["selected_after_warmup"]).sum()),
                "runs": len(runs),
                **miner_strength(table, evaluation, audit),
            }
            for (evaluation, model, variant), runs in per_seed.groupby(
                ["evaluation", "model", "variant"], sort=False
            )
            if variant == "baseline"
        ]
    rows = []
    for row in differences.itertuples():
        runs = per_seed[
            (per_seed["evaluation"] == row.evaluation)
            & (per_seed["model"] == row.model)
            & (per_seed["variant"] == row.variant)
        ]
        rows.append(
            {
                "level": level,
                "evaluation": row.evaluation,
                "model": row.model,
                "variant": row.variant,
                "seeds": row.seeds,
                "baseline_rsum": means[(row.evaluation, row.model, "baseline")],
                "baseline_i2t_r1": recall[(row.evaluation, row.model, "baseline")],
                "aoq_rsum": means[(row.evaluation, row.model, row.variant)],
                "rsum_difference": row.rsum_difference,
                "low": row.low,
                "high": row.high,
                "verdict": row.verdict,
                "warmup_checkpoints": int((~runs["selected_after_warmup"]).sum()),
                "runs": len(runs),
                **miner_strength(table, row.evaluation, audit),
            }
        )
    return rows


def study_table(levels):
    """`levels`: (row label, results folder of its dataset) pairs in sweep order; a level's label
    is its number as written (level_label in pipeline_steps/study.py)."""
    return pd.DataFrame([row for level, folder in levels for row in level_rows(level, folder)])


def _share(value):
    return "–" if value is None or value != value else f"{100 * value:.0f}%"


def _r1(value):
    return "–" if value is None or value != value else f"{value:.1f}"


def _signed(value):
    return "–" if value != value else f"{value:+.1f}"


def markdown(table, axis, title):
    rows_are = "row (one factor changed from the base)" if axis == "factor" else f"level of {axis}"
    lines = [
        f"# {title}",
        "",
        f"Δ rsum: AOQ minus the baseline of the same seed, averaged over seeds, with its paired "
        f"bootstrap interval over test images (docs/evaluation.md#statistics), per {rows_are}. "
        "'Warm-up': AOQ runs whose selected checkpoint predates the end of the warm-up (summed "
        "hinge), of all its runs. Baseline R@1: the baselines' mean i2t R@1. Miner: the mining "
        "baseline's i2t R@1 on this evaluation, and "
        "the share of its offline candidates (i2t / t2i) scoring above the anchor's positive.",
        "",
    ]
    for evaluation, group in table.groupby("evaluation", sort=False):
        lines += [
            f"## {evaluation}",
            "",
            f"| {axis} | Model | Method | Baseline rsum | Baseline R@1 | AOQ rsum | Δ rsum | Interval "
            "| Verdict | Warm-up | Miner R@1 | Above positive |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in group.itertuples():
            lines.append(
                f"| {row.level} | {row.model} | {method(row.variant)} "
                f"| {row.baseline_rsum:.1f} | {_r1(row.baseline_i2t_r1)} | {_r1(row.aoq_rsum)} "
                f"| {_signed(row.rsum_difference)} | [{_signed(row.low)}, {_signed(row.high)}] "
                f"| {row.verdict} "
                f"| {row.warmup_checkpoints}/{row.runs} | {_r1(row.miner_i2t_r1)} "
                f"| {_share(row.above_positive_i2t)} / {_share(row.above_positive_t2i)} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_gain(table, axis_name, target):
    """One panel per evaluation: Δ rsum per row, one series per model and method, with the
    interval as error bars; against the level (a line) or, for factors, one row each (points)."""
    plt = _pyplot()
    evaluations = list(dict.fromkeys(table["evaluation"]))
    factors = axis_name == "factor"
    labels = list(dict.fromkeys(table["level"]))
    size = (5.5 * len(evaluations), 0.45 * len(labels) + 2) if factors else (4.5 * len(evaluations), 4)
    fig, axes = plt.subplots(1, len(evaluations), figsize=size, squeeze=False, sharey=factors)
    groups = list(dict.fromkeys(zip(table["model"], table["variant"])))
    baseline_only = table["rsum_difference"].isna().all()
    quantity = "baseline i2t R@1" if baseline_only else "Δ rsum vs baseline"
    if baseline_only:  # no AOQ runs: the baselines' recall instead, without an interval
        recall = table["baseline_i2t_r1"]
        table = table.assign(rsum_difference=recall, low=recall, high=recall)
    for axis, evaluation in zip(axes[0], evaluations):
        rows = table[table["evaluation"] == evaluation]
        for k, ((model, variant), line) in enumerate(rows.groupby(["model", "variant"], sort=False)):
            error = [line["rsum_difference"] - line["low"], line["high"] - line["rsum_difference"]]
            label = f"{model} {method(variant)}"
            if factors:  # one horizontal bar per row, series side by side
                offset = (k - (len(groups) - 1) / 2) * 0.25
                where = [labels.index(level) + offset for level in line["level"]]
                axis.errorbar(line["rsum_difference"], where, xerr=error, fmt="o", capsize=3, label=label)
            else:
                levels = line["level"].astype(float)
                axis.errorbar(levels, line["rsum_difference"], yerr=error, fmt="o-", capsize=4, label=label)
        if factors:
            axis.axvline(0, color="grey", linewidth=0.8)
            axis.set_yticks(range(len(labels)), labels)
            axis.invert_yaxis()
            axis.set(title=evaluation, xlabel=quantity)
        else:
            axis.axhline(0, color="grey", linewidth=0.8)
            axis.set(title=evaluation, xlabel=axis_name, ylabel=quantity)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, target)
    plt.close(fig)
