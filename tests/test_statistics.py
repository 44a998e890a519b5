"""The report's statistics: per-image rsum shares, the paired bootstrap, verdicts, seed summaries
and the report built from per-seed metrics with ranks (pipeline_steps/retrieval/bootstrap.py,
pipeline_steps/reporting/)."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline_steps import report
from pipeline_steps.evaluate import write_ranks
from pipeline_steps.retrieval import bootstrap
from pipeline_steps.retrieval.metrics import ranks_path, recall_metrics


def random_ranks(rng, n_img, spread):
    return rng.integers(0, spread, n_img), rng.integers(0, spread, 5 * n_img)


@pytest.mark.parametrize("n_img", [1, 7, 100])
def test_per_image_shares_average_to_rsum(n_img):
    rng = np.random.default_rng(n_img)
    i2t, t2i = random_ranks(rng, n_img, 15)
    assert bootstrap.per_image_rsum(i2t, t2i).mean() == pytest.approx(recall_metrics(i2t, t2i)["rsum"])


def test_per_image_shares_average_to_the_5fold_rsum():
    """COCO 1K: the mean over 5 equal folds of fold rsums is the mean of per-image shares."""
    rng = np.random.default_rng(3)
    i2t, t2i = random_ranks(rng, 50, 12)
    folds = [recall_metrics(i2t[10 * f : 10 * f + 10], t2i[50 * f : 50 * f + 50])["rsum"] for f in range(5)]
    assert bootstrap.per_image_rsum(i2t, t2i).mean() == pytest.approx(np.mean(folds))


def test_hand_computed_share():
    # image 0: i2t rank 0 (hits @1, @5, @10 = 3), captions ranks 0,4,9,10,20 -> (3+2+1+0+0)/5 = 1.2
    share = bootstrap.per_image_rsum([0], [0, 4, 9, 10, 20])
    assert share.tolist() == [pytest.approx(100 * (3 + 1.2))]


def test_identical_runs_give_the_interval_zero_zero():
    assert bootstrap.interval(np.zeros(500)) == (0.0, 0.0, 0.0)


def test_a_constant_shift_gives_that_shift():
    assert bootstrap.interval(np.full(300, 20.0)) == (20.0, 20.0, 20.0)
    values = np.full(300, 20.0)
    values[0] = 20.5  # not constant: the resampling path, still tightly around the shift
    mean, low, high = bootstrap.interval(values, resamples=2000)
    assert 20.0 <= low <= mean <= high <= 20.5


def test_interval_matches_the_normal_approximation_on_a_large_sample():
    """An independent check: for a mean of many iid values the percentile interval is close to
    mean +- 1.96 sd / sqrt(n)."""
    values = np.random.default_rng(0).normal(3.0, 10.0, 4000)
    mean, low, high = bootstrap.interval(values, resamples=4000, seed=1)
    half = 1.959964 * values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(mean - half, abs=0.08 * half)
    assert high == pytest.approx(mean + half, abs=0.08 * half)


def test_resampling_equals_a_plain_loop_with_the_same_draws():
    values = np.random.default_rng(5).normal(size=37)
    rng = np.random.default_rng(9)
    slow = [values[rng.integers(0, 37, 37)].mean() for _ in range(bootstrap.RESAMPLES_PER_BLOCK)]
    fast = bootstrap.bootstrap_means(values, bootstrap.RESAMPLES_PER_BLOCK, 9)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("low", "high", "word"), [(0.1, 2, "better"), (-2, -0.1, "worse"), (-1, 1, "no clear difference")]
)
def test_verdicts(low, high, word):
    assert bootstrap.verdict(low, high) == word


def write_metrics(folder, variant, seeds, i2t, t2i, epoch=5, weights="w"):
    path = folder / variant / ("ensemble" if len(seeds) > 1 else f"seed{seeds[0]}") / "test_1k.json"
    path.parent.mkdir(parents=True)
    models = [
        {
            "model": "vsrn",
            "variant": variant,
            "seed": s,
            "epoch": epoch,
            "iteration": 10 * epoch,
            "weights_sha256": f"{weights}{s}",
            "train_config": {"max_violation_warmup_epochs": 3},
        }
        for s in seeds
    ]
    origin = {"git_commit": "abc", "git_dirty": False, "settings_digest": "d", "torch": "t", "numpy": "n"}
    result = {
        **recall_metrics(i2t, t2i),
        "evaluation": "test_1k",
        "label": "vsrn",
        "protocol": "full",
        "split": "test",
        "models": models,
        "provenance": {**origin, "device": "cpu", "tokenizer": "tok"},
    }
    path.write_text(json.dumps(result))
    write_ranks(ranks_path(path), i2t, t2i)
    return path


def test_report_pairs_seeds_and_flags_warmup_and_identical_weights(tmp_path):
    """Two seeds; AOQ's ranks are the baseline's with every i2t query moved to rank 0 on seed 0
    and unchanged on seed 1: the pooled difference is half of seed 0's, computed by hand."""
    rng = np.random.default_rng(0)
    n = 40
    base = {s: random_ranks(rng, n, 30) for s in (0, 1)}
    aoq = {0: (np.zeros(n, dtype=int), base[0][1]), 1: base[1]}
    paths = [write_metrics(tmp_path, "baseline", [s], *base[s]) for s in (0, 1)]
    paths.append(write_metrics(tmp_path, "adapoffquin", [0], *aoq[0], epoch=2))  # warm-up checkpoint
    paths.append(write_metrics(tmp_path, "adapoffquin", [1], *aoq[1], weights="w"))  # baseline's weights
    names = ("report.md", "report.csv", "curves.png", "stats.png", "d.csv", "table.html")
    out = {k: tmp_path / "r" / k for k in names}
    report.main(
        [
            "--metrics",
            *map(str, paths),
            "--out-md",
            str(out["report.md"]),
            "--out-csv",
            str(out["report.csv"]),
        ]
        + ["--out-png", str(out["curves.png"]), "--out-stats-png", str(out["stats.png"])]
        + ["--bootstrap-resamples", "500", "--out-differences", str(out["d.csv"])]
        + ["--out-html", str(out["table.html"])]
    )
    seed0 = recall_metrics(*aoq[0])["rsum"] - recall_metrics(*base[0])["rsum"]
    expected = seed0 / 2  # seed 1 adds a zero difference
    md = out["report.md"].read_text()
    assert f"| vsrn | +AdapOffQuin | 0,1 | {expected:+.1f} |" in md
    assert "better" in md.split("+AdapOffQuin | 0,1")[1].splitlines()[0]
    mean_rsum = np.mean([recall_metrics(*base[s])["rsum"] for s in (0, 1)])
    std_rsum = np.std([recall_metrics(*base[s])["rsum"] for s in (0, 1)], ddof=1)
    assert f"{mean_rsum:.1f} ± {std_rsum:.1f} |" in md
    assert "+AdapOffQuin seed0 (test_1k): the selected checkpoint (epoch 2) predates" in md
    assert "baseline seed1 and adapoffquin seed1 (test_1k) score with identical weights" in md
    assert "- git_commit: abc" in md
    csv = out["report.csv"].read_text().splitlines()
    assert len(csv) == 5 and "git_commit" in csv[0] and "checkpoint_iterations" in csv[0]
    assert out["stats.png"].read_bytes()[:4] == b"\x89PNG"
    differences = pd.read_csv(out["d.csv"])
    assert differences[["model", "variant", "seeds"]].values.tolist() == [["vsrn", "adapoffquin", "0,1"]]
    assert differences["rsum_difference"].iloc[0] == pytest.approx(expected, abs=1e-4)
    assert differences["low"].iloc[0] > 0 and differences["resamples"].iloc[0] == 500
    # The HTML page holds the same cells as report.md's tables, and the warnings.
    page = out["table.html"].read_text()
    assert f"<td>+AdapOffQuin</td><td>0,1</td><td>{expected:+.1f}</td>" in page
    assert f"<td>{mean_rsum:.1f} ± {std_rsum:.1f}</td></tr>" in page
    assert "<li>vsrn +AdapOffQuin seed0 (test_1k): the selected checkpoint (epoch 2) predates" in page
    assert page.count("<table>") == 2  # over seeds and paired differences (no ensemble rows here)
    assert sorted(p.name for p in out["report.md"].parent.iterdir()) == sorted(names)  # no temporaries
