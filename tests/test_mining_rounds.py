"""Refreshed mining rounds, the mining audit and false-negative control through the workflow on
the tiny config: round 2 mines with round 1's AdapOffQuin model, warm-starts from it, is
audited against round 1 and reported beside it; going back to one round reruns no training,
mining or evaluation."""

import copy
import json

import numpy as np
import pytest

from tests.helpers import planned_jobs, snakemake, succeeded, tiny_config

pytestmark = pytest.mark.workflow


def two_rounds():
    config = tiny_config()
    config["aoq"]["variants"] = ["adapoffquin"]
    config["mining"].update(rounds=2, warm_start=True, exclude="duplicate_captions")
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rounds")
    config = two_rounds()
    result = succeeded(workdir, config, "-p")
    return workdir, config, result.stdout + result.stderr


def test_round_two_mines_with_round_one_and_starts_from_it(finished):
    workdir, _, printed = finished
    results = workdir / "results" / "demo_precomp"
    assert (results / "embeddings/vsepp/adapoffquin/seed0/train.h5").exists()
    round2 = results / "candidates/vsepp/adapoffquin/seed0"
    assert np.load(round2 / "i2t_demo.npy").shape == (40, 30)
    # The round-2 run trains on those candidates, from round 1's weights.
    command = next(
        line
        for line in printed.splitlines()
        if "train/vsepp/adapoffquin_round2/seed0/model_best.pt" in line and "--out-best" in line
    )
    assert f"--candidates-i2t {round2.relative_to(workdir)}/i2t_demo.npy" in command
    assert "--init-from results/demo_precomp/train/vsepp/adapoffquin/seed0/model_best.pt" in command


def test_each_round_is_audited_and_reported(finished):
    workdir, _, _ = finished
    results = workdir / "results" / "demo_precomp"
    first = json.loads((results / "candidates/vsepp/seed0/audit.json").read_text())
    second = json.loads((results / "candidates/vsepp/adapoffquin/seed0/audit.json").read_text())
    assert "overlap" not in first and 0 <= second["overlap"]["i2t"] <= 1
    for audit in (first, second):
        # mining.exclude: duplicate_captions leaves no duplicate of a positive among the candidates
        assert audit["i2t"]["duplicate_caption_share"] == 0 and audit["t2i"]["duplicate_caption_share"] == 0
        assert audit["i2t"]["sorted_rows_share"] == 1 and audit["i2t"]["family_recall"] is not None
    report = (results / "report" / "report.md").read_text()
    assert "| vsepp | +AdapOffQuin | 1 |" in report and "| vsepp | +AdapOffQuin (round 2) | 1 |" in report
    assert "../candidates/vsepp/adapoffquin/seed0/audit.png" in report
    assert "duplicate captions excluded" in report


def test_back_to_one_round_reruns_only_the_report(finished):
    workdir, config, _ = finished
    one = copy.deepcopy(config)
    one["mining"].update(rounds=1, warm_start=False)  # warm_start without a later round is refused
    result = snakemake(workdir, one, "-n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert {rule for rule, _ in planned_jobs(result)} == {"report", "all"}, planned_jobs(result)
