"""The report's figures: training curves, and rsum per method with its interval."""

from pathlib import Path

import pandas as pd

from pipeline_steps.common.atomic import atomic_path
from pipeline_steps.reporting.tables import method


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target):
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def plot_curves(log_paths, target):
    """Dev score and training loss against iteration, one line per run."""
    plt = _pyplot()
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
    _save(fig, target)
    plt.close(fig)


def plot_rsum_intervals(intervals, level, target):
    """One panel per evaluation: per model and method the mean rsum over seeds with its interval,
    and each seed's rsum as a dot."""
    plt = _pyplot()
    evaluations = list(dict.fromkeys(intervals["evaluation"])) if len(intervals) else []
    fig, axes = plt.subplots(1, max(1, len(evaluations)), figsize=(4.5 * max(1, len(evaluations)), 4))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    for axis, evaluation in zip(axes, evaluations):
        rows = intervals[intervals["evaluation"] == evaluation].reset_index(drop=True)
        labels = [f"{r.model}\n{method(r.variant)}" for r in rows.itertuples()]
        for x, row in enumerate(rows.itertuples()):
            axis.errorbar(
                x,
                row.rsum,
                yerr=[[row.rsum - row.low], [row.high - row.rsum]],
                fmt="o",
                capsize=4,
                color="C0",
            )
            axis.plot([x] * len(row.seed_rsums), row.seed_rsums, ".", color="C1", alpha=0.8)
        axis.set_xticks(range(len(rows)), labels, fontsize=8)
        axis.set(title=evaluation, ylabel="rsum", xlim=(-0.6, len(rows) - 0.4))
    axes[0].set_title(
        (evaluations[0] if evaluations else "no evaluations")
        + f"\n(mean over seeds, {100 * level:.0f}% interval; dots: seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    _save(fig, target)
    plt.close(fig)
