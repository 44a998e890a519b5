"""The study driver (pipeline_steps/study.py): each level's Snakemake run gets its own dataset and
the knob's value, and the study table and figure restate the levels' reports."""

import pandas as pd
import pytest
import yaml

from pipeline_steps import study
from tests.helpers import REPO, tiny_config, write_config


def write_preset(path, knob, levels, prefix="d"):
    path.write_text(
        yaml.safe_dump({"study": {"name": "s", "knob": knob, "levels": levels, "dataset_prefix": prefix}})
    )
    return path


def write_level_report(folder, rows, differences):
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "report.csv", index=False)
    pd.DataFrame(differences).to_csv(folder / "differences.csv", index=False)


def seed_row(variant, seed, rsum, after_warmup=True, evaluation="test_1k"):
    return {
        "evaluation": evaluation,
        "model": "vsrn",
        "variant": variant,
        "subset": f"seed{seed}",
        "rsum": rsum,
        "selected_after_warmup": after_warmup,
    }


def difference(mean, low, high, verdict):
    return {
        "evaluation": "test_1k",
        "model": "vsrn",
        "variant": "adapoffquin",
        "seeds": "0,1",
        "rsum_difference": mean,
        "low": low,
        "high": high,
        "verdict": verdict,
    }


def test_study_table_restates_each_level(tmp_path):
    preset = write_preset(tmp_path / "study.yaml", "near_duplicates", [0, 1.5])
    level0 = [seed_row("baseline", 0, 100.0), seed_row("baseline", 1, 110.0)]
    level0 += [seed_row("adapoffquin", 0, 120.0, after_warmup=False), seed_row("adapoffquin", 1, 112.0)]
    # An ensemble row must not enter the per-seed means.
    level0.append({**seed_row("baseline", 0, 999.0), "subset": "ensemble"})
    level0_differences = [difference(11.0, 2.0, 20.0, "better")]
    write_level_report(tmp_path / "results/d0_precomp/report", level0, level0_differences)
    level1 = [
        seed_row(v, s, 200.0 if v == "baseline" else 190.0)
        for v in ("baseline", "adapoffquin")
        for s in (0, 1)
    ]
    level1_differences = [difference(-10.0, -15.0, -5.0, "worse")]
    write_level_report(tmp_path / "results/d1.5_precomp/report", level1, level1_differences)

    assert study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"]) == 0

    out = tmp_path / "results/study/s"
    table = pd.read_csv(out / "study.csv")
    assert table["level"].tolist() == [0, 1.5]
    assert table["baseline_rsum"].tolist() == [105.0, 200.0]
    assert table["aoq_rsum"].tolist() == [116.0, 190.0]
    assert table["rsum_difference"].tolist() == [11.0, -10.0]
    assert table["warmup_checkpoints"].tolist() == [1, 0] and table["runs"].tolist() == [2, 2]
    md = (out / "study.md").read_text()
    assert "| 0 | vsrn | +AdapOffQuin | 105.0 | 116.0 | +11.0 | [+2.0, +20.0] | better | 1/2 |" in md
    assert "| 1.5 | vsrn | +AdapOffQuin | 200.0 | 190.0 | -10.0 | [-15.0, -5.0] | worse | 0/2 |" in md
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missing_level_is_named_in_one_line(tmp_path):
    preset = tmp_path / "study.yaml"
    preset.write_text(yaml.safe_dump({"study": {"name": "s", "knob": "caption_detail", "levels": [0.5, 1]}}))
    with pytest.raises(SystemExit, match=r"study.yaml: study: missing dataset_prefix"):
        study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"])
    write_preset(preset, "caption_detail", [0.5, 1], prefix="c")
    with pytest.raises(SystemExit, match=r"c0.5_precomp/report/differences.csv: missing"):
        study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"])


@pytest.mark.workflow
def test_each_level_runs_on_its_own_dataset_with_its_knob(tmp_path, capfd):
    """A dry run of every level through Snakemake: each generates its own data with the level's
    knob value and writes under its own results folder."""
    preset = write_preset(tmp_path / "study.yaml", "near_duplicates", [0, 2.5], prefix="nd")
    base = write_config(tmp_path, tiny_config())
    argv = [str(preset), "--directory", str(tmp_path), "--base-config", str(base), "--", "-n", "-p"]
    with pytest.raises(SystemExit, match="nd0_precomp/report/differences.csv: missing"):
        study.main(argv)  # a dry run leaves nothing to aggregate
    printed = capfd.readouterr().out
    for level, dataset in (("0", "nd0_precomp"), ("2.5", "nd2.5_precomp")):
        assert f"--out results/demo_data/{dataset} " in printed and f"--near-duplicates {level} " in printed
        assert f"results/{dataset}/report/report.md" in printed


def test_the_shipped_preset_sweeps_at_least_three_levels():
    settings, _ = study.read_study(REPO / "presets/demo_study.yaml")
    assert (
        len(settings["levels"]) >= 3
        and settings["knob"] in yaml.safe_load((REPO / "config.yaml").read_text())["demo"]
    )
