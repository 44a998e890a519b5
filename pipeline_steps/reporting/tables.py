"""The report's results tables as cells, rendered two ways from the same cells: Markdown
(report.md) and a self-contained HTML page (results_table.html), the form Snakemake's HTML report
displays (it shows HTML, images and PDF; a Markdown file there is only a download)."""

import html
from dataclasses import dataclass, field

from models.variants import VARIANT_LABELS
from pipeline_steps.retrieval.metrics import RECALL_COLUMNS

# Columns over the recall cells: (label, how many columns it spans).
RECALL_GROUPS = [("", 3), ("Sentence retrieval", 3), ("Image retrieval", 3), ("", 1)]
RUN_HEADER = ["Model", "Method", "Seeds", "R@1", "R@5", "R@10", "R@1", "R@5", "R@10", "rsum"]


@dataclass
class Table:
    header: list
    rows: list = field(default_factory=list)
    groups: list = field(default_factory=list)


@dataclass
class Section:
    """One evaluation: its tables, each under a caption."""

    evaluation: str
    split: str
    protocol: str
    tables: list = field(default_factory=list)


def method(variant):
    """The paper's label of a method; a later mining round's runs (adapoffquin_round2) get theirs
    with the round (docs/mining_audit.md)."""
    base, _, round_ = variant.partition("_round")
    label = VARIANT_LABELS.get(base, base)
    return f"{label} (round {round_})" if round_ else label


def seed_table(summary):
    """Mean ± standard deviation over seeds (the mean alone for one seed)."""
    table = Table(RUN_HEADER, groups=RECALL_GROUPS)
    for _, row in summary.iterrows():
        cells = []
        for column in RECALL_COLUMNS:
            mean, std = row[f"{column}_mean"], row[f"{column}_std"]
            cells.append(f"{mean:.1f} ± {std:.1f}" if row["n_seeds"] > 1 else f"{mean:.1f}")
        table.rows.append([row["model"], method(row["variant"]), str(row["n_seeds"]), *cells])
    return table


def plain_table(rows):
    """One row per evaluated set (the ensembles), its metrics as they are."""
    table = Table(RUN_HEADER, groups=RECALL_GROUPS)
    for _, row in rows.iterrows():
        cells = [f"{row[c]:.1f}" for c in RECALL_COLUMNS]
        table.rows.append([row["model"], method(row["variant"]), str(row["seeds"]), *cells])
    return table


def differences_table(diffs, level):
    table = Table(
        ["Model", "Method", "Seeds", "Δ rsum vs baseline", f"{100 * level:.0f}% interval", "Verdict"]
    )
    for _, row in diffs.iterrows():
        table.rows.append(
            [
                row["model"],
                method(row["variant"]),
                str(row["seeds"]),
                f"{row['rsum_difference']:+.1f}",
                f"[{row['low']:+.1f}, {row['high']:+.1f}]",
                row["verdict"],
            ]
        )
    return table


def sections(table, summary, diffs, level):
    """Per evaluation, in the metrics table's order: per-seed means, ensembles, paired differences
    (each only where there is a row)."""
    out = []
    for evaluation, group in table.groupby("evaluation", sort=False):
        first = group.iloc[0]
        section = Section(evaluation, first["split"], first["protocol"])
        per_seed = summary[summary["evaluation"] == evaluation]
        if len(per_seed):
            section.tables.append(("Over seeds", seed_table(per_seed)))
        others = group[~group["subset"].str.startswith("seed")]
        if len(others):
            section.tables.append(("Ensembles", plain_table(others)))
        evaluation_diffs = diffs[diffs["evaluation"] == evaluation] if len(diffs) else diffs
        if len(evaluation_diffs):
            differences = differences_table(evaluation_diffs, level)
            section.tables.append(("Paired difference from the baseline", differences))
        out.append(section)
    return out


def _markdown_row(cells):
    return "|" + "".join(f" {c} |" if c else " |" for c in cells)


def markdown_table(table):
    groups = [[label] + [""] * (span - 1) for label, span in table.groups]
    lines = [_markdown_row(sum(groups, []))] if groups else []
    lines += [_markdown_row(table.header), "|" + "---|" * len(table.header)]
    return lines + [_markdown_row(row) for row in table.rows]


def markdown_sections(sections):
    lines = []
    for section in sections:
        lines += [f"## {section.evaluation} (split `{section.split}`, protocol `{section.protocol}`)", ""]
        for caption, table in section.tables:
            lines += [f"{caption}:", ""] + markdown_table(table) + [""]
    return lines


def _cells(tag, cells):
    return "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in cells)


def html_table(table):
    head = []
    if table.groups:
        spans = "".join(f'<th colspan="{span}">{html.escape(label)}</th>' for label, span in table.groups)
        head.append(f'<tr class="groups">{spans}</tr>')
    head.append(f"<tr>{_cells('th', table.header)}</tr>")
    body = "".join(f"<tr>{_cells('td', row)}</tr>" for row in table.rows)
    return f"<table><thead>{''.join(head)}</thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: sans-serif; margin: 1em 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.4em; text-align: right; white-space: nowrap; }
th { background: #eee; }
td:nth-child(-n+2), th:nth-child(-n+2) { text-align: left; }
tr.groups th { text-align: center; }
h2 code { font-size: 0.9em; }
"""


def html_page(title, intro, sections, warnings):
    """A whole HTML document, styles inline: Snakemake's report embeds it as one data URI."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(paragraph)}</p>" for paragraph in intro),
    ]
    for section in sections:
        parts.append(f'<section id="{html.escape(section.evaluation)}">')
        parts.append(
            f"<h2>{html.escape(section.evaluation)} (split <code>{html.escape(section.split)}</code>, "
            f"protocol <code>{html.escape(section.protocol)}</code>)</h2>"
        )
        for caption, table in section.tables:
            parts += [f"<h3>{html.escape(caption)}</h3>", html_table(table)]
        parts.append("</section>")
    parts.append("<h2>Warnings</h2>")
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    parts.append(f"<ul>{items}</ul>" if warnings else "<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
