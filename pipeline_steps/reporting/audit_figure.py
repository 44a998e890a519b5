"""The mining audit's figure: per direction, the offline candidates' scores at ranks 1, 10, 100
and 300 beside the online hardest negative of random training batches (boxes: quartiles;
whiskers: 5th and 95th percentiles, from the audit's summaries)."""

from pipeline_steps.reporting.figures import _pyplot, _save


def _box(label, stats):
    return {
        "label": label,
        "med": stats["p50"],
        "q1": stats["p25"],
        "q3": stats["p75"],
        "whislo": stats["p5"],
        "whishi": stats["p95"],
        "mean": stats["mean"],
        "fliers": [],
    }


def plot_audit(audit, target):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, name in zip(axes, ("i2t", "t2i")):
        d = audit[name]
        boxes = [_box(f"online\nB={audit['batch_size']}", d["online_hardest"])]
        boxes += [_box(f"rank {r}", s) for r, s in d["scores_at_rank"].items() if s["n"]]
        axis.bxp(boxes, showmeans=True)
        share = d["duplicate_caption_share"]
        axis.set(
            ylabel="score",
            title=f"{name}: top-{d['top_k']} duplicates {100 * share:.2f}%, "
            f"above positive {100 * d['above_positive_share']:.1f}%",
        )
        axis.title.set_fontsize(9)
    fig.suptitle("offline candidates vs the online hardest negative", fontsize=10)
    fig.tight_layout()
    _save(fig, target)
    plt.close(fig)
