"""The study driver (pipeline_steps/study.py): each level's Snakemake run gets its own dataset and
the knob's value, and the study table and figure restate the levels' reports."""

import json
import re

import pandas as pd
import pytest
import yaml

from pipeline_steps import study
from pipeline_steps.common.errors import InputError
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
        "i2t_r1": 10.0 + 2.5 * seed,
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


def stamp_rows(preset, workdir):
    """Mark every row of `preset` as run with today's settings (what a finished run leaves)."""
    args = study.parse_args([str(preset), "--directory", str(workdir)])
    settings, _ = study.read_study(preset)
    for label, overlay in settings["rows"]:
        row = study.Row(args, settings, workdir, label, overlay)
        row.stamp.parent.mkdir(parents=True, exist_ok=True)
        row.stamp.write_text(json.dumps({"settings": row.settings_digest()}))


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
    # Level 1.5's miner: seed 1 of vsrn, i2t R@1 of its baseline row, and its audit's shares.
    audit = tmp_path / "results/d1.5_precomp/candidates/vsrn/seed1/audit.json"
    audit.parent.mkdir(parents=True)
    audit.write_text(
        json.dumps({"i2t": {"above_positive_share": 0.25}, "t2i": {"above_positive_share": 0.125}})
    )
    stamp_rows(preset, tmp_path)

    assert study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"]) == 0

    out = tmp_path / "results/study/s"
    table = pd.read_csv(out / "study.csv")
    assert table["level"].tolist() == [0, 1.5]
    assert table["baseline_rsum"].tolist() == [105.0, 200.0]
    assert table["aoq_rsum"].tolist() == [116.0, 190.0]
    assert table["rsum_difference"].tolist() == [11.0, -10.0]
    assert table["warmup_checkpoints"].tolist() == [1, 0] and table["runs"].tolist() == [2, 2]
    assert table["miner_i2t_r1"].isna().tolist() == [True, False] and table["miner_i2t_r1"][1] == 12.5
    md = (out / "study.md").read_text()
    level0_line = "| 0 | vsrn | +AdapOffQuin | 105.0 | 11.2 | 116.0 | +11.0 | [+2.0, +20.0] | better | 1/2 |"
    assert level0_line + " – | – / – |" in md
    level1_line = (
        "| 1.5 | vsrn | +AdapOffQuin | 200.0 | 11.2 | 190.0 | -10.0 | [-15.0, -5.0] | worse | 0/2 | 12.5 |"
    )
    assert level1_line + " 25% / 12% |" in md
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missing_level_is_named_in_one_line(tmp_path):
    preset = tmp_path / "study.yaml"
    preset.write_text(yaml.safe_dump({"study": {"name": "s", "knob": "caption_detail", "levels": [0.5, 1]}}))
    with pytest.raises(SystemExit, match=r"study.yaml: study: missing dataset_prefix"):
        study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"])
    write_preset(preset, "caption_detail", [0.5, 1], prefix="c")
    with pytest.raises(SystemExit, match=r"row 0.5 has not run: run the study without --aggregate-only"):
        study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"])
    stamp_rows(preset, tmp_path)
    with pytest.raises(SystemExit, match=r"c0.5_precomp/report/differences.csv: missing"):
        study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"])


def test_aggregating_after_a_config_change_is_refused(tmp_path):
    """--aggregate-only redraws only rows whose settings are those they ran with."""
    preset = write_preset(tmp_path / "study.yaml", "near_duplicates", [0, 1.5])
    (tmp_path / "config.yaml").write_text("run: {seeds: [0, 1, 2]}\n")
    stamp_rows(preset, tmp_path)
    (tmp_path / "config.yaml").write_text("run: {seeds: [0, 1]}\n")
    with pytest.raises(SystemExit, match=r"row 0 ran with other settings \(a config changed since\)"):
        study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"])


@pytest.mark.workflow
def test_each_level_runs_on_its_own_dataset_with_its_knob(tmp_path, capfd):
    """A dry run of every level through Snakemake: each generates its own data with the level's
    knob value and writes under its own results folder."""
    preset = write_preset(tmp_path / "study.yaml", "near_duplicates", [0, 2.5], prefix="nd")
    base = write_config(tmp_path, tiny_config())
    argv = [str(preset), "--directory", str(tmp_path), "--base-config", str(base), "--", "-n", "-p"]
    assert study.main(argv) == 0
    printed = capfd.readouterr().out
    assert printed.rstrip().endswith("study s: a dry run, so nothing to tabulate")
    for level, dataset in (("0", "nd0_precomp"), ("2.5", "nd2.5_precomp")):
        assert f"--out results/demo_data/{dataset} " in printed and f"--near-duplicates {level} " in printed
        assert f"results/{dataset}/report/report.md" in printed


@pytest.mark.workflow
def test_factor_rows_reach_any_config_key_and_share_the_base_data(tmp_path, capfd):
    """Named factors: a training key reaches that row's AOQ runs only; a row that leaves demo:
    alone shares the base's generated data, one that changes it makes its own."""
    preset = tmp_path / "factors.yaml"
    factors = {
        "base": None,
        "offline7": {"aoq": {"train": {"offline_size": 7}}},
        "detach": {"aoq": {"loss": {"detach_weights": True}}},
        "nd0": {"demo": {"near_duplicates": 0}},
    }
    settings = {"name": "f", "dataset_prefix": "fx", "factors": factors}
    preset.write_text(yaml.safe_dump({"study": settings}, sort_keys=False))
    base = write_config(tmp_path, tiny_config())
    argv = [str(preset), "--directory", str(tmp_path), "--base-config", str(base), "--", "-n", "-p"]
    assert study.main(argv) == 0
    printed = capfd.readouterr().out
    blocks = printed.split("study f: row ")[1:]
    assert [block.split(":", 1)[0] for block in blocks] == list(factors)
    by_row = dict(zip(factors, blocks))
    for name, block in by_row.items():
        trains = re.findall(r"pipeline_steps\.train .*", block)
        offline = {int(x) for x in re.findall(r'\\?"offline_size\\?": (\d+)', " ".join(trains))}
        assert offline == ({7} if name == "offline7" else {20}), (name, offline)
        detached = re.findall(r'\\?"detach_weights\\?": (true|false)', " ".join(trains))
        assert set(detached) == ({"true"} if name == "detach" else {"false"})
        data = "results/demo_data/fxnd0_precomp" if name == "nd0" else tiny_config()["dataset"]["path"]
        assert f"--out {data} " in block and f"results/fx{name}_precomp/report/report.md" in block


BAD_PRESETS = {
    "levels null": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "n_train", "levels": None}},
        "levels: a non-empty list",
    ),
    "levels a number": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "n_train", "levels": 3}},
        "levels: a non-empty list",
    ),
    "levels empty": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "n_train", "levels": []}},
        "levels: a non-empty list",
    ),
    "levels strings": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "n_train", "levels": ["a"]}},
        "levels: 'a' is not a finite number",
    ),
    "level nan": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "n_train", "levels": [float("nan")]}},
        "levels: nan is not a finite number",
    ),
    "level true": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "n_train", "levels": [True]}},
        "levels: True is not a finite number",
    ),
    "repeated level": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "n_train", "levels": [2, 2]}},
        "rows named twice: 2",
    ),
    "preset a list": ([1, 2], "a study preset is a mapping"),
    "study a list": ({"study": [1]}, "study: missing"),
    "no rows": ({"study": {"name": "s", "dataset_prefix": "p"}}, "missing knob and levels, or factors"),
    "both forms": (
        {
            "study": {
                "name": "s",
                "dataset_prefix": "p",
                "knob": "n_train",
                "levels": [2],
                "factors": {"a": {}},
            }
        },
        "either knob and levels or factors",
    ),
    "factors empty": (
        {"study": {"name": "s", "dataset_prefix": "p", "factors": {}}},
        "factors: a non-empty mapping",
    ),
    "factor a list": (
        {"study": {"name": "s", "dataset_prefix": "p", "factors": {"a": [1]}}},
        "factors: a: a config overlay",
    ),
    "factor name": (
        {"study": {"name": "s", "dataset_prefix": "p", "factors": {"a/b": {}}}},
        "factors: 'a/b' is not a row name",
    ),
    "prefix underscore": (
        {"study": {"name": "s", "dataset_prefix": "p_", "factors": {"a": {}}}},
        "dataset_prefix: 'p_' is not a prefix",
    ),
    "knob path": (
        {"study": {"name": "s", "dataset_prefix": "p", "knob": "../x", "levels": [1]}},
        "knob: '../x' is not a config key",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PRESETS))
def test_bad_presets_are_refused_in_one_line(tmp_path, case):
    content, expected = BAD_PRESETS[case]
    preset = tmp_path / "bad.yaml"
    preset.write_text(yaml.safe_dump(content))
    with pytest.raises(SystemExit) as stop:
        study.main([str(preset), "--directory", str(tmp_path)])
    message = str(stop.value)
    assert message.startswith(f"error: {preset}: ") and expected in message and "\n" not in message, message
    assert not (tmp_path / "results").exists()


def test_a_preset_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    preset = tmp_path / "latin1.yaml"
    preset.write_bytes("study: {name: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(
        SystemExit, match=r"latin1.yaml: not UTF-8 text \(invalid continuation byte at byte 17\)"
    ):
        study.main([str(preset), "--directory", str(tmp_path)])


def test_close_levels_get_distinct_reversible_names():
    labels = [study.level_label(x) for x in (0.5000001, 0.5000002, 4, 4.0, 1e-05, 1000000)]
    assert labels == ["0.5000001", "0.5000002", "4", "4.0", "1e-05", "1000000"]
    assert [float(x) for x in labels] == [0.5000001, 0.5000002, 4, 4.0, 1e-05, 1000000]


@pytest.mark.workflow
def test_every_row_is_checked_before_the_first_one_runs(tmp_path):
    """caption_detail 2 is out of range: refused before level 0.5 runs anything."""
    preset = write_preset(tmp_path / "study.yaml", "caption_detail", [0.5, 2], prefix="cd")
    base = write_config(tmp_path, tiny_config())
    with pytest.raises(SystemExit) as stop:
        study.main([str(preset), "--directory", str(tmp_path), "--base-config", str(base)])
    message = str(stop.value)
    assert (
        message.startswith("error: study s: row 2: ") and "caption_detail" in message and "\n" not in message
    )
    assert (
        not (tmp_path / "results" / "demo_data").exists()
        and not (tmp_path / "results" / "cd0.5_precomp").exists()
    )


@pytest.mark.parametrize("preset", ["demo_study.yaml", "demo_study_size.yaml", "demo_regime.yaml"])
def test_the_shipped_presets_are_read(preset):
    settings, _ = study.read_study(REPO / "presets" / preset)
    assert len(settings["rows"]) >= 2


def test_the_near_duplicate_preset_sweeps_a_demo_key_at_three_levels():
    settings, _ = study.read_study(REPO / "presets/demo_study.yaml")
    demo = yaml.safe_load((REPO / "config.yaml").read_text())["demo"]
    assert len(settings["rows"]) >= 3 and settings["axis"].removeprefix("demo.") in demo


def test_a_baseline_only_study_tabulates_the_baselines_recall(tmp_path):
    """aoq.variants: [] in a study (how strong a miner does the data give?): no AOQ rows, the
    baselines' mean rsum and i2t R@1 per level."""
    preset = write_preset(tmp_path / "study.yaml", "demo.feature_noise", [1.0, 0.5], prefix="fn")
    columns = ["evaluation", "model", "variant", "seeds", "rsum_difference", "low", "high", "verdict"]
    for label, rsum in (("1.0", 100.0), ("0.5", 150.0)):
        rows = [seed_row("baseline", s, rsum + s) for s in (0, 1)]
        folder = tmp_path / f"results/fn{label}_precomp/report"
        folder.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(folder / "report.csv", index=False)
        pd.DataFrame(columns=columns).to_csv(folder / "differences.csv", index=False)
    stamp_rows(preset, tmp_path)
    assert study.main([str(preset), "--directory", str(tmp_path), "--aggregate-only"]) == 0
    table = pd.read_csv(tmp_path / "results/study/s/study.csv")
    assert table["variant"].tolist() == ["baseline", "baseline"]
    assert table["baseline_rsum"].tolist() == [100.5, 150.5] and table["baseline_i2t_r1"].tolist() == [
        11.25,
        11.25,
    ]
    assert table["rsum_difference"].isna().all()
    md = (tmp_path / "results/study/s/study.md").read_text()
    assert "| 0.5 | vsrn | baseline | 150.5 | 11.2 | – | – | [–, –] | – | 0/2 | – | – / – |" in md


def test_rows_runs_and_tabulates_some_rows(tmp_path):
    """--rows: a long study in parts; the table holds the rows asked for, which must have run."""
    preset = write_preset(tmp_path / "study.yaml", "near_duplicates", [0, 1.5])
    rows = [seed_row(v, s, 100.0 + s) for v in ("baseline", "adapoffquin") for s in (0, 1)]
    write_level_report(
        tmp_path / "results/d0_precomp/report", rows, [difference(0.5, -1.0, 2.0, "no clear difference")]
    )
    stamp_rows(preset, tmp_path)
    (tmp_path / "results/study/s/levels/1.5.done.json").unlink()
    argv = [str(preset), "--directory", str(tmp_path), "--aggregate-only"]
    with pytest.raises(SystemExit, match="row 1.5 has not run"):
        study.main(argv)
    assert study.main(argv + ["--rows", "0"]) == 0
    assert pd.read_csv(tmp_path / "results/study/s/study.csv")["level"].tolist() == [0]
    with pytest.raises(SystemExit, match="--rows: no such row: 7"):
        study.main(argv + ["--rows", "7"])


def test_adding_a_row_leaves_the_finished_rows_current(tmp_path):
    """A row's stamp covers the settings it ran with, not the other rows of the study."""
    preset = tmp_path / "study.yaml"
    study_section = {
        "name": "s",
        "dataset_prefix": "f",
        "factors": {"a": {"aoq": {"train": {"offline_size": 10}}}},
    }
    preset.write_text(yaml.safe_dump({"study": study_section, "report": {"title": "t"}}))
    stamp_rows(preset, tmp_path)
    args = study.parse_args([str(preset), "--directory", str(tmp_path)])

    def row_a():
        settings, _ = study.read_study(preset)
        label, overlay = settings["rows"][0]
        return study.Row(args, settings, tmp_path, label, overlay)

    row_a().check_current()
    study_section["factors"]["b"] = {"aoq": {"loss": {"detach_weights": True}}}
    preset.write_text(yaml.safe_dump({"study": study_section, "report": {"title": "t"}}))
    row_a().check_current()  # another row added: still current
    preset.write_text(
        yaml.safe_dump({"study": study_section, "report": {"title": "t"}, "run": {"seeds": [0]}})
    )
    with pytest.raises(InputError, match="row a ran with other settings"):
        row_a().check_current()  # a setting every row reads changed
