"""Write the report: per evaluation the per-seed means and standard deviations laid out like the
paper's ablation, the ensemble rows, each AOQ method's paired difference from the baseline with its
bootstrap interval and verdict, warnings, figures and provenance.

Inputs:  metrics JSONs written by `evaluate` (each names its evaluation, models, seeds and
         variant; per-query ranks beside it in <name>.ranks.npz) and the per-validation CSV logs
         written by `train`.
Outputs: `report.md`; `report.csv` (one row per metrics JSON: every metric, the checkpoints'
         epochs and iterations, provenance); `curves.png` (dev score and loss against iteration);
         `statistics.png` (rsum per method with its interval, per evaluation); optionally
         `differences.csv` (the paired differences from the baseline, one row per evaluation,
         model and AOQ method, for tables and studies built on several reports).
The statistics are described in docs/evaluation.md#statistics.

Example:
    python -m pipeline_steps.report --metrics results/x/eval/*/*/*/*.json \
        --val-logs results/x/train/*/*/*/val_log.csv --out-md report.md --out-csv report.csv \
        --out-png curves.png --out-stats-png statistics.png
"""

import argparse
import sys
from pathlib import Path

from models.losses import VARIANT_LABELS
from pipeline_steps.common.atomic import remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.reporting.figures import plot_curves, plot_rsum_intervals
from pipeline_steps.reporting.rows import PROVENANCE_COLUMNS, metrics_table
from pipeline_steps.reporting.statistics import (
    Bootstrap,
    identical_checkpoints,
    paired_differences,
    rsum_intervals,
    seed_summary,
)
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS as COLUMNS

GROUP_HEADER = "| | | | Sentence retrieval | | | Image retrieval | | | |"
HEADER = "| Model | Method | Seeds | R@1 | R@5 | R@10 | R@1 | R@5 | R@10 | rsum |"
RULE = "|---|---|---|---|---|---|---|---|---|---|"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--val-logs", nargs="*", default=[])
    p.add_argument("--title", default="AOQ reproduction")
    p.add_argument("--bootstrap-resamples", type=int, default=Bootstrap.resamples)
    p.add_argument("--bootstrap-level", type=float, default=Bootstrap.level)
    p.add_argument("--bootstrap-seed", type=int, default=Bootstrap.seed)
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-png", required=True)
    p.add_argument("--out-stats-png", required=True)
    p.add_argument("--out-differences", help="CSV of the paired differences from the baseline")
    return p.parse_args(argv)


def _method(variant):
    return VARIANT_LABELS.get(variant, variant)


def _seed_table(summary):
    lines = [GROUP_HEADER, HEADER, RULE]
    for _, row in summary.iterrows():
        cells = []
        for column in COLUMNS:
            mean, std = row[f"{column}_mean"], row[f"{column}_std"]
            cells.append(f"{mean:.1f} ± {std:.1f}" if row["n_seeds"] > 1 else f"{mean:.1f}")
        lines.append(
            f"| {row['model']} | {_method(row['variant'])} | {row['n_seeds']} | {' | '.join(cells)} |"
        )
    return lines


def _plain_rows(rows):
    lines = [GROUP_HEADER, HEADER, RULE]
    for _, row in rows.iterrows():
        cells = " | ".join(f"{row[c]:.1f}" for c in COLUMNS)
        lines.append(f"| {row['model']} | {_method(row['variant'])} | {row['seeds']} | {cells} |")
    return lines


def _differences(diffs, settings):
    level = f"{100 * settings.level:.0f}%"
    lines = [
        f"| Model | Method | Seeds | Δ rsum vs baseline | {level} interval | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    for _, row in diffs.iterrows():
        lines.append(
            f"| {row['model']} | {_method(row['variant'])} | {row['seeds']} | {row['rsum_difference']:+.1f} "
            f"| [{row['low']:+.1f}, {row['high']:+.1f}] | {row['verdict']} |"
        )
    return lines


def warnings(table):
    """Rows whose checkpoints predate the end of a warm-up, and rows with identical weights (each
    once, with the evaluations it concerns)."""
    out = []
    early = table[~table["selected_after_warmup"]]
    for (model, variant, subset, epochs), group in early.groupby(
        ["model", "variant", "subset", "checkpoint_epochs"], sort=False
    ):
        out.append(
            f"- {model} {_method(variant)} {subset} ({', '.join(group['evaluation'])}): the selected "
            f"checkpoint (epoch {epochs}) predates the end of the warm-up, where the loss sums over "
            "all negatives: it does not show the method's hardest-negative regime."
        )
    pairs = {}
    for evaluation, model, first, second in identical_checkpoints(table):
        pairs.setdefault((model, first, second), []).append(evaluation)
    for (model, first, second), evaluations in pairs.items():
        out.append(
            f"- {model} {first} and {second} ({', '.join(evaluations)}) score with identical "
            "weights: they are one model, not two results."
        )
    return out


def provenance_lines(table):
    lines = ["## Provenance", ""]
    for column in PROVENANCE_COLUMNS:
        values = sorted({str(v) for v in table[column]})
        lines.append(f"- {column}: {', '.join(values)}")
    lines += ["", "Per row (with each checkpoint's epoch and iteration and the settings digest): report.csv."]
    return lines


def markdown(table, summary, diffs, settings, title, figures):
    lines = [
        f"# {title}",
        "",
        "Sentence retrieval = image to text (i2t); image retrieval = text to image (t2i). Per-seed "
        "rows give the mean ± standard deviation over the seeds; ensemble rows score with the mean "
        "of their models' similarity matrices (the paper's rows are two-model ensembles).",
        "",
        f"Δ rsum: each AOQ method minus the baseline of the same seed, averaged over seeds. The "
        f"interval is a paired percentile bootstrap ({settings.resamples} resamples, seed "
        f"{settings.seed}) over test images, each with its 5 captions, pooled over seeds (each "
        "image's rsum share averaged over seeds); 'better' or 'worse' when it excludes 0, else "
        "'no clear difference' (docs/evaluation.md#statistics).",
        "",
    ]
    for evaluation, group in table.groupby("evaluation", sort=False):
        first = group.iloc[0]
        lines += [f"## {evaluation} (split `{first['split']}`, protocol `{first['protocol']}`)", ""]
        per_seed = summary[summary["evaluation"] == evaluation]
        if len(per_seed):
            lines += ["Over seeds:", ""] + _seed_table(per_seed) + [""]
        others = group[~group["subset"].str.startswith("seed")]
        if len(others):
            lines += ["Ensembles:", ""] + _plain_rows(others) + [""]
        evaluation_diffs = diffs[diffs["evaluation"] == evaluation] if len(diffs) else diffs
        if len(evaluation_diffs):
            lines += ["Paired difference from the baseline:", ""]
            lines += _differences(evaluation_diffs, settings) + [""]
    flagged = warnings(table)
    lines += ["## Warnings", ""] + (flagged or ["None."]) + [""]
    lines += [f"![{alt}]({name})" for alt, name in figures] + [""]
    lines += provenance_lines(table)
    return "\n".join(lines) + "\n"


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    outputs = [args.out_md, args.out_csv, args.out_png, args.out_stats_png, args.out_differences]
    remove_stale_temporaries(*[o for o in outputs if o])
    settings = Bootstrap(args.bootstrap_resamples, args.bootstrap_level, args.bootstrap_seed)
    table = metrics_table(args.metrics)
    summary = seed_summary(table)
    diffs = paired_differences(table, settings)
    write_text_atomic(args.out_csv, table.to_csv(index=False, float_format="%.4f"))
    if args.out_differences:
        described = diffs.assign(level=settings.level, resamples=settings.resamples)
        write_text_atomic(args.out_differences, described.to_csv(index=False, float_format="%.4f"))
    plot_curves(args.val_logs, args.out_png)
    plot_rsum_intervals(rsum_intervals(table, settings), settings.level, args.out_stats_png)
    figures = [
        ("rsum per method with its interval", Path(args.out_stats_png).name),
        ("training curves", Path(args.out_png).name),
    ]
    write_text_atomic(args.out_md, markdown(table, summary, diffs, settings, args.title, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
