"""Write the report: a table laid out like the paper's ablation, the same as CSV, training curves.

Inputs:  metrics JSONs written by `evaluate` (each names its evaluation, models and variant) and
         the per-validation CSV logs written by `train`.
Outputs: `report.md` (one table per evaluation: rows baseline, +OffTri, +OffQuin, +AdapOffQuin
         per model; columns R@1/5/10 of sentence (i2t) and image (t2i) retrieval, rsum),
         `report.csv` (every metric of every row) and `curves.png` (dev score against iteration).

Example:
    python -m pipeline_steps.report --metrics results/eval/*/*/*.json \
        --val-logs results/train/*/*/*/val_log.csv --out-md report.md --out-csv report.csv \
        --out-png curves.png
"""

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from models.losses import VARIANT_LABELS
from pipeline_steps.common.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS as COLUMNS

HEADER = "| Model | Method | R@1 | R@5 | R@10 | R@1 | R@5 | R@10 | rsum |"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--val-logs", nargs="*", default=[])
    p.add_argument("--title", default="AOQ reproduction")
    p.add_argument("--out-md", required=True)
    p.add_argument("--out-csv", required=True)
    p.add_argument("--out-png", required=True)
    return p.parse_args(argv)


def metrics_table(paths):
    rows = []
    for path in paths:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
        variants = {m["variant"] for m in result["models"]}
        rows.append(
            {
                "evaluation": result["evaluation"],
                "split": result["split"],
                "protocol": result["protocol"],
                "model": result.get("label", result["models"][0]["model"]),
                "variant": variants.pop() if len(variants) == 1 else "mixed",
                "ensemble_size": len(result["models"]),
                **{k: result[k] for k in COLUMNS + ["i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr"]},
            }
        )
    table = pd.DataFrame(rows)
    order = {v: i for i, v in enumerate(VARIANT_LABELS)}
    table["_order"] = table["variant"].map(order).fillna(len(order))
    return table.sort_values(["evaluation", "model", "_order"]).drop(columns="_order")


def markdown(table, title):
    lines = [
        f"# {title}",
        "",
        "Sentence retrieval = image to text (i2t); image retrieval = text to image (t2i). "
        "Rows with an ensemble size above 1 score with the mean of the models' similarity matrices.",
        "",
    ]
    for evaluation, group in table.groupby("evaluation", sort=False):
        first = group.iloc[0]
        lines += [
            f"## {evaluation} (split `{first['split']}`, protocol `{first['protocol']}`)",
            "",
            "| | | Sentence retrieval | | | Image retrieval | | | |",
            HEADER,
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, row in group.iterrows():
            method = VARIANT_LABELS.get(row["variant"], row["variant"])
            size = f" (ensemble of {row['ensemble_size']})" if row["ensemble_size"] > 1 else ""
            cells = " | ".join(f"{row[c]:.1f}" for c in COLUMNS)
            lines.append(f"| {row['model']}{size} | {method} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(log_paths, target):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.get_cmap("tab20").colors  # more runs than the default cycle's 10 colours
    for axis in axes:
        axis.set_prop_cycle(color=colours)
    for path in log_paths:
        log = pd.read_csv(path)
        label = "/".join(Path(path).parent.parts[-3:])  # model/variant/seed
        axes[0].plot(log["iteration"], log["val_score4"], marker=".", label=label)
        axes[1].plot(log["iteration"], log["train_loss"], marker=".", label=label)
    axes[0].set(xlabel="iteration", ylabel="dev i2t R@1+R@5 + t2i R@1+R@5", title="validation")
    # Log scale: warm-up epochs sum the hinge over all negatives and are orders of magnitude larger.
    axes[1].set(
        xlabel="iteration", ylabel="mean training loss since last validation", title="training", yscale="log"
    )
    if log_paths:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    remove_stale_temporaries(args.out_md, args.out_csv, args.out_png)
    table = metrics_table(args.metrics)
    write_text_atomic(args.out_csv, table.to_csv(index=False, float_format="%.4f"))
    plot_curves(args.val_logs, args.out_png)
    write_text_atomic(
        args.out_md, markdown(table, args.title) + f"\n![training curves]({Path(args.out_png).name})\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
