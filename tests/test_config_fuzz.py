"""Config fuzzing: bad configurations generated across every section are each refused in one line
naming the key (`config: <key>: ...`), and the shipped config and presets are accepted. The
checks run in-process (workflow/config_checks.py, what rules/validate.smk calls); a sample goes
through a real `snakemake -n` to show the wiring prints the same line without a traceback."""

import copy
import math
import sys

import pytest
import yaml

from models.variants import VARIANTS
from tests.helpers import REPO, snakemake, tiny_config

sys.path.insert(0, str(REPO / "workflow"))
import config_checks  # noqa: E402 (the workflow's module, beside the Snakefile)

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
BASE = tiny_config()


def verdict(config, workdir="."):
    """The refusal line, or None when the config is accepted."""
    try:
        config_checks.validated(config, SCHEMA, list(VARIANTS), workdir)
    except config_checks.ConfigError as refusal:
        return str(refusal)
    return None


def leaves(value, path=()):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, (*path, i))
    else:
        yield path, value


def nodes(value, path=()):
    """Every mapping in the config, with its path."""
    if isinstance(value, dict):
        yield path, value
        for key, item in value.items():
            yield from nodes(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from nodes(item, (*path, i))


def changed(path, value):
    config = copy.deepcopy(BASE)
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return config


def key_of(path):
    return ".".join(map(str, path)) or "(top level)"


def generated_cases():
    """(case id, config, the key its refusal must name)."""
    cases = []
    for path, value in leaves(BASE):
        if type(value) is int:  # a whole-number float for every integer key
            cases.append((f"{key_of(path)}={float(value)}", changed(path, float(value)), key_of(path)))
        if type(value) is float:  # NaN and both infinities for every real-valued key
            for bad in (math.nan, math.inf, -math.inf):
                cases.append((f"{key_of(path)}={bad}", changed(path, bad), key_of(path)))
    for path, _ in nodes(BASE):  # an unknown key in every mapping
        if path and path[0] in ("models", "ensembles"):
            continue  # keys there are names the user chooses; a model's keys are checked below
        config = changed((*path, "zz_unknown"), 1) if path else {**copy.deepcopy(BASE), "zz_unknown": 1}
        cases.append((f"unknown key in {key_of(path)}", config, key_of(path)))
    return cases


CURATED = [
    ("unknown key in a model", ("models", "vsepp", "zz_unknown"), 1, "models.vsepp"),
    ("unknown key in a model's train", ("models", "vsepp", "train"), {"zz_unknown": 1}, "models.vsepp.train"),
    ("empty seeds", ("run", "seeds"), [], "run.seeds"),
    ("empty splits", ("dataset", "splits"), [], "dataset.splits"),
    ("empty evaluation", ("evaluation",), [], "evaluation"),
    ("empty mirrors", ("download", "urls"), [], "download.urls"),
    ("repeated seed", ("run", "seeds"), [0, 0], "run.seeds"),
    ("repeated variant", ("aoq", "variants"), ["offtri", "offtri"], "aoq.variants"),
    ("repeated split", ("dataset", "splits"), ["train", "dev", "dev"], "dataset.splits"),
    ("repeated run.models", ("run", "models"), ["vsepp", "vsepp"], "run.models"),
    (
        "repeated evaluation name",
        ("evaluation",),
        [
            {"name": "e", "split": "test", "protocol": "full"},
            {"name": "e", "split": "testall", "protocol": "full"},
        ],
        "evaluation",
    ),
    ("ensemble member twice", ("ensembles",), {"pair": ["vsepp", "vsepp"]}, "ensembles.pair"),
    ("a string for a number", ("aoq", "loss", "alpha"), "0.3", "aoq.loss.alpha"),
    ("a bool for a number", ("aoq", "train", "epochs"), True, "aoq.train.epochs"),
    ("seed a float", ("mining", "seed"), 0.0, "mining.seed"),
    ("batch size a float", ("baseline", "train", "batch_size"), 50.0, "baseline.train.batch_size"),
    ("learning rate nan", ("baseline", "train", "learning_rate"), math.nan, "baseline.train.learning_rate"),
    ("beta inf", ("aoq", "loss", "beta"), math.inf, "aoq.loss.beta"),
    ("bootstrap level nan", ("report", "bootstrap", "level"), math.nan, "report.bootstrap.level"),
    ("caption detail nan", ("demo", "caption_detail"), math.nan, "demo.caption_detail"),
    ("absurd training size", ("demo", "n_train"), 10**12, "demo.n_train"),
    ("evaluation on a missing split", ("dataset", "splits"), ["train", "dev", "test"], "evaluation.1.split"),
    ("5fold on a split of 7 images", ("demo", "n_test"), 7, "evaluation.0.protocol"),
    ("warm start without rounds", ("mining", "warm_start"), True, "mining.warm_start"),
    ("two vocabularies", ("dataset", "vocab_pkl"), "v.pkl", "dataset.vocab_json"),
    ("a vocabulary that is not there", ("dataset", "vocab_json"), "no/such/vocab.json", "dataset.vocab_json"),
    ("rounds zero", ("mining", "rounds"), 0, "mining.rounds"),
]


def curated_config(case):
    _, path, value, _ = case
    config = changed(path, value)
    if case[0] == "5fold on a split of 7 images":
        config["evaluation"] = [{"name": "t", "split": "test", "protocol": "5fold"}]
    if case[0] == "two vocabularies":
        config["dataset"]["vocab_json"] = "v.json"
    return config


ALL_CASES = [(name, config, key) for name, config, key in generated_cases()] + [
    (case[0], curated_config(case), case[3]) for case in CURATED
]


def test_the_fuzz_covers_every_section_with_enough_cases():
    sections = {key.split(".")[0].split("[")[0] for _, _, key in ALL_CASES}
    assert len(ALL_CASES) >= 50
    assert sections >= {
        "dataset",
        "demo",
        "models",
        "run",
        "resources",
        "baseline",
        "mining",
        "aoq",
        "report",
    }
    assert sections >= set(BASE) - {"ensembles", "released", "download"} | {"evaluation"}


@pytest.mark.parametrize("name,config,key", ALL_CASES, ids=[case[0] for case in ALL_CASES])
def test_a_bad_config_is_refused_in_one_line_naming_its_key(tmp_path, name, config, key):
    (tmp_path / "v.json").write_text("{}")
    (tmp_path / "v.pkl").write_bytes(b"")
    message = verdict(config, tmp_path)
    assert message is not None, f"{name}: accepted"
    assert "\n" not in message and message.startswith(f"config: {key}"), message


@pytest.mark.parametrize(
    "preset",
    [None] + sorted(p.name for p in (REPO / "presets").glob("*.yaml")),
    ids=lambda p: p or "config.yaml",
)
def test_the_shipped_config_and_presets_are_accepted(preset):
    def merged(base, extra):
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merged(base[key], value)
            else:
                base[key] = value
        return base

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    if preset:
        merged(config, yaml.safe_load((REPO / "presets" / preset).read_text()))
    assert verdict(config, REPO) is None


def test_a_baseline_only_config_is_legitimate():
    config = changed(("aoq", "variants"), [])
    assert verdict(config) is None


@pytest.mark.workflow
@pytest.mark.parametrize(
    "name", ["mining.rounds=1.0", "aoq.loss.alpha=nan", "repeated evaluation name", "unknown key in aoq.loss"]
)
def test_snakemake_prints_the_same_line_without_a_traceback(tmp_path, name):
    config, key = next((c, k) for n, c, k in ALL_CASES if n == name)
    result = snakemake(tmp_path, config, "-n")
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and output.splitlines()[-1] == verdict(copy.deepcopy(config)), output[
        -1500:
    ]
    assert "Traceback" not in output and 'File "' not in output
