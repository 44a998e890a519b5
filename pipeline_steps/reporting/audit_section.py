"""The report's mining-audit section: one row per audited candidate set and direction, and the
audit figures, linked relative to the report (docs/mining_audit.md)."""

import json
import os
from pathlib import Path

HEADER = (
    "| Candidates | Direction | Online hardest: median offline rank | not in top-K | "
    "Score rank 1 / 300 / online (median) | Duplicates of a positive | Above the positive "
    "| Family recall | Overlap with round 1 |"
)


def _percent(value):
    return "–" if value is None else f"{100 * value:.1f}%"


def _where(path):
    """candidates/<model>/[<method>/]seed<k>/audit.json -> model [method] seed<k>."""
    parts = Path(path).parent.parts
    start = parts.index("candidates") + 1 if "candidates" in parts else len(parts) - 2
    return " ".join(parts[start:])


def audit_lines(paths, report_dir, exclude="none"):
    if not paths:
        return []
    lines = [
        "## Mining audit",
        "",
        "How hard the offline candidates are against the online hardest negative of random training "
        "batches, and how many may be positives (docs/mining_audit.md). Top-K: what AOQ draws from "
        "(i2t offline_size captions, t2i offline_size / 5 images).",
        "",
    ]
    if exclude != "none":
        lines += [f"Mining used mining.exclude: {exclude} (duplicate captions excluded).", ""]
    lines += [HEADER, "|---|---|---|---|---|---|---|---|---|"]
    figures = []
    for path in paths:
        audit = json.loads(Path(path).read_text(encoding="utf-8"))
        for name in ("i2t", "t2i"):
            d = audit[name]
            at = d["scores_at_rank"]
            scores = " / ".join(f"{at[r]['p50']:.3f}" if r in at else "–" for r in ("1", "300"))
            rank = d["online_hardest_offline_rank"]
            overlap = _percent(audit["overlap"][name]) if "overlap" in audit else "–"
            lines.append(
                f"| {_where(path)} | {name} (K={d['top_k']}) | {rank['median']:.0f} "
                f"| {_percent(rank['share_beyond_top_k'])} | {scores} / {d['online_hardest']['p50']:.3f} "
                f"| {_percent(d['duplicate_caption_share'])} | {_percent(d['above_positive_share'])} "
                f"| {_percent(d['family_recall'])} | {overlap} |"
            )
        figure = Path(path).with_suffix(".png")
        figures.append(f"![mining audit {_where(path)}]({os.path.relpath(figure, report_dir)})")
    return lines + [""] + figures + [""]
