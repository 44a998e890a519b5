"""A study's table and figure: per level of a demo-data knob, AOQ's paired rsum difference from
the baseline (from each level's report/differences.csv) beside the baseline's mean rsum and how
many of the AOQ runs selected a warm-up checkpoint (from report/report.csv)."""

from pathlib import Path

import pandas as pd

from pipeline_steps.common.errors import InputError
from pipeline_steps.reporting.figures import _pyplot, _save
from pipeline_steps.reporting.tables import method


def _read(path):
    if not Path(path).is_file():
        raise InputError(f"{path}: missing (has this level's Snakemake run finished?)")
    return pd.read_csv(path)


def level_rows(level, report_dir):
    """One row per (evaluation, model, AOQ method) of one level's report."""
    differences = _read(Path(report_dir) / "differences.csv")
    table = _read(Path(report_dir) / "report.csv")
    per_seed = table[table["subset"].str.startswith("seed")]
    means = per_seed.groupby(["evaluation", "model", "variant"])["rsum"].mean()
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
                "aoq_rsum": means[(row.evaluation, row.model, row.variant)],
                "rsum_difference": row.rsum_difference,
                "low": row.low,
                "high": row.high,
                "verdict": row.verdict,
                "warmup_checkpoints": int((~runs["selected_after_warmup"]).sum()),
                "runs": len(runs),
            }
        )
    return rows


def study_table(levels):
    """`levels`: (level, report folder) pairs in sweep order."""
    return pd.DataFrame([row for level, folder in levels for row in level_rows(level, folder)])


def markdown(table, knob, title):
    lines = [
        f"# {title}",
        "",
        f"Δ rsum: AOQ minus the baseline of the same seed, averaged over seeds, with its paired "
        f"bootstrap interval over test images (docs/evaluation.md#statistics), per level of "
        f"demo.{knob}. 'Warm-up': AOQ runs whose selected checkpoint predates the end of the "
        "warm-up (summed hinge), of all its runs.",
        "",
    ]
    for evaluation, group in table.groupby("evaluation", sort=False):
        lines += [
            f"## {evaluation}",
            "",
            f"| {knob} | Model | Method | Baseline rsum | AOQ rsum | Δ rsum | Interval | Verdict | Warm-up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in group.itertuples():
            lines.append(
                f"| {row.level:g} | {row.model} | {method(row.variant)} "
                f"| {row.baseline_rsum:.1f} | {row.aoq_rsum:.1f} | {row.rsum_difference:+.1f} "
                f"| [{row.low:+.1f}, {row.high:+.1f}] | {row.verdict} "
                f"| {row.warmup_checkpoints}/{row.runs} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot_gain(table, knob, target):
    """One panel per evaluation: Δ rsum against the knob's level, one line per model and method,
    with the interval as error bars."""
    plt = _pyplot()
    evaluations = list(dict.fromkeys(table["evaluation"]))
    fig, axes = plt.subplots(1, len(evaluations), figsize=(4.5 * len(evaluations), 4), squeeze=False)
    for axis, evaluation in zip(axes[0], evaluations):
        rows = table[table["evaluation"] == evaluation]
        for (model, variant), line in rows.groupby(["model", "variant"], sort=False):
            axis.errorbar(
                line["level"],
                line["rsum_difference"],
                yerr=[line["rsum_difference"] - line["low"], line["high"] - line["rsum_difference"]],
                fmt="o-",
                capsize=4,
                label=f"{model} {method(variant)}",
            )
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set(title=evaluation, xlabel=f"demo.{knob}", ylabel="Δ rsum vs baseline")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, target)
    plt.close(fig)
