"""Every relative link of the README and docs/ (and the presets' comments) reaches a file that
exists and, where it names one, a heading of that file: links name headings, not section
numbers, so a renumbered or renamed heading breaks this test instead of a reader's click."""

import re

import pytest

from tests.helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#+ ", line)}


def links():
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if not re.match(r"[a-z]+:", target):  # http:, mailto: ...
                yield doc, target


@pytest.mark.parametrize("doc,target", list(links()), ids=lambda x: str(x).split("/")[-1])
def test_a_relative_link_reaches_its_file_and_heading(doc, target):
    path, _, anchor = target.partition("#")
    file = (doc.parent / path).resolve() if path else doc
    assert file.exists(), f"{doc.name}: {target}: no such file"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), f"{doc.name}: {target}: no heading with that anchor in {file.name}"


def test_the_slug_rule_on_known_headings():
    assert slug(" Warm-up: `max_violation_warmup_epochs`") == "warm-up-max_violation_warmup_epochs"
    assert slug(" Accelerated implementations (`accel/`)") == "accelerated-implementations-accel"
