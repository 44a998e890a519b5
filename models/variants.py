"""The loss variants: the paper's ablation rows, in its order (docs/method.md), and what each adds
to the online triplet. This table is the one list of variants. It imports nothing heavy, so the
workflow reads it when Snakemake starts (workflow/rules/validate.smk); models/losses.py computes
the terms. A new variant is a line here (and, for a new kind of term, its code in
`retrieval_loss`)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Terms:
    """What a variant adds to the online triplet, and its row label in the paper's tables."""

    label: str
    offline_triplet: bool = False
    quintuplet: bool = False
    adaptive: bool = False


VARIANTS = {
    "baseline": Terms("baseline"),
    "offtri": Terms("+OffTri", offline_triplet=True),
    "offquin": Terms("+OffQuin", offline_triplet=True, quintuplet=True),
    "adapoffquin": Terms("+AdapOffQuin", offline_triplet=True, quintuplet=True, adaptive=True),
}
VARIANT_LABELS = {name: terms.label for name, terms in VARIANTS.items()}
