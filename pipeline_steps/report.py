"""Write the report: per evaluation the per-seed means and standard deviations laid out like the
paper's ablation, the ensemble rows, each AOQ method's paired difference from the baseline with its
bootstrap interval and verdict, warnings, figures and provenance.

Inputs:  metrics JSONs written by `evaluate` (each names its evaluation, models, seeds and
         variant; per-query ranks beside it in <name>.ranks.npz), the per-validation CSV logs
         written by `train` and the mining audits (`audit_mining`), summed up in one section.
Outputs: `report.md`; `report.csv` (one row per metrics JSON: every metric, the checkpoints'
         epochs and iterations, provenance); `curves.png` (dev score and loss against iteration);
         `statistics.png` (rsum per method with its interval, per evaluation); optionally
         `differences.csv` (the paired differences from the baseline, one row per evaluation,
         model and AOQ method, for tables and studies built on several reports); optionally
         `results_table.html` (report.md's tables as a self-contained HTML page, which Snakemake's
         HTML report displays).
The statistics are described in docs/evaluation.md#statistics.

Example:
    python -m pipeline_steps.report --metrics results/x/eval/*/*/*/*.json \
        --val-logs results/x/train/*/*/*/val_log.csv --out-md report.md --out-csv report.csv \
        --out-png curves.png --out-stats-png statistics.png --out-html results_table.html
"""

import argparse
import sys
from pathlib import Path

from pipeline_steps.common.atomic import remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.reporting.audit_section import audit_lines
from pipeline_steps.reporting.figures import plot_curves, plot_rsum_intervals
from pipeline_steps.reporting.rows import PROVENANCE_COLUMNS, metrics_table
from pipeline_steps.reporting.statistics import (
    Bootstrap,
    identical_checkpoints,
    paired_differences,
    rsum_intervals,
    seed_summary,
)
from pipeline_steps.reporting.tables import html_page, markdown_sections, method, sections


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
    p.add_argument("--out-html", help="the results tables as a self-contained HTML page")
    p.add_argument("--audits", nargs="*", default=[], help="audit.json of the mining runs (audit_mining)")
    p.add_argument("--mining-exclude", default="none", help="mining.exclude, stated in the report")
    return p.parse_args(argv)


def warnings(table):
    """Rows whose checkpoints predate the end of a warm-up, and rows with identical weights (each
    once, with the evaluations it concerns)."""
    out = []
    early = table[~table["selected_after_warmup"]]
    for (model, variant, subset, epochs), group in early.groupby(
        ["model", "variant", "subset", "checkpoint_epochs"], sort=False
    ):
        out.append(
            f"- {model} {method(variant)} {subset} ({', '.join(group['evaluation'])}): the selected "
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


def introduction(settings):
    """What the tables show (report.md and the HTML page open with it)."""
    return [
        "Sentence retrieval = image to text (i2t); image retrieval = text to image (t2i). Per-seed "
        "rows give the mean ± standard deviation over the seeds; ensemble rows score with the mean "
        "of their models' similarity matrices (the paper's rows are two-model ensembles).",
        f"Δ rsum: each AOQ method minus the baseline of the same seed, averaged over seeds. The "
        f"interval is a paired percentile bootstrap ({settings.resamples} resamples, seed "
        f"{settings.seed}) over test images, each with its 5 captions, pooled over seeds (each "
        "image's rsum share averaged over seeds); 'better' or 'worse' when it excludes 0, else "
        "'no clear difference' (docs/evaluation.md#statistics).",
    ]


def markdown(table, tables, settings, title, figures, audits=()):
    lines = [f"# {title}", ""]
    for paragraph in introduction(settings):
        lines += [paragraph, ""]
    lines += markdown_sections(tables)
    flagged = warnings(table)
    lines += ["## Warnings", ""] + (flagged or ["None."]) + [""]
    lines += [f"![{alt}]({name})" for alt, name in figures] + [""]
    lines += list(audits)
    lines += provenance_lines(table)
    return "\n".join(lines) + "\n"


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    outputs = [args.out_md, args.out_csv, args.out_png, args.out_stats_png]
    remove_stale_temporaries(*[o for o in outputs + [args.out_differences, args.out_html] if o])
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
    tables = sections(table, summary, diffs, settings.level)
    audits = audit_lines(args.audits, Path(args.out_md).parent, args.mining_exclude)
    write_text_atomic(args.out_md, markdown(table, tables, settings, args.title, figures, audits))
    if args.out_html:
        items = [line.removeprefix("- ") for line in warnings(table)]  # Markdown bullets as list items
        page = html_page(args.title, introduction(settings), tables, items)
        write_text_atomic(args.out_html, page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
