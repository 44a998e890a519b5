"""Adding a loss variant is a one-line change: a copy of the repository whose models/variants.py
alone gains a throwaway variant plans, trains and reports it."""

import subprocess
import sys

import pytest

from tests.helpers import ENV, copy_of_the_repository, snakemake, tiny_config

pytestmark = pytest.mark.workflow
THROWAWAY = '    "quinonly": Terms("+QuinOnly", quintuplet=True),\n'


def test_a_variant_added_to_variants_py_alone_runs_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    copy_of_the_repository(repo)
    losses = repo / "models" / "variants.py"
    text = losses.read_text()
    anchor = '    "adapoffquin": Terms('
    assert anchor in text
    losses.write_text(text.replace(anchor, THROWAWAY + anchor))  # the one change

    config = tiny_config()
    config["aoq"]["variants"] = ["quinonly"]
    work = tmp_path / "work"
    work.mkdir()
    result = snakemake(work, config, repo=repo)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = work / "results" / "demo_precomp"
    assert "| vsepp | +QuinOnly |" in (results / "report" / "report.md").read_text()
    log = (work / "logs" / "demo_precomp" / "train" / "vsepp_quinonly_seed0.log").read_text()
    assert "variant=quinonly" in log

    # Its loss is the online triplet plus the quintuplet term, nothing else.
    check = (
        "import torch; from models.losses import *; S = torch.tensor([[0.5, 0.4], [0.6, 0.7]]); "
        "o = OfflineScores(*[torch.tensor(v) for v in ([0.55, 0.2], [0.45, 0.9], [0.6, 0.1], [0.3, 0.75])]); "
        "loss, terms = retrieval_loss(S, o, LossConfig('quinonly')); "
        "print(sorted(terms), round(loss.item(), 6))"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=repo, capture_output=True, text=True, env=ENV, check=True
    ).stdout.strip()
    assert out == "['online', 'quintuplet'] 0.65"  # hand-computed in tests/test_losses.py: 0.5 + 0.15
