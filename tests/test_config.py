"""The configuration: refused when Snakemake starts, in one line naming the key; the schema mirrors
the code it describes; a model overrides its baseline and AOQ training separately. The checks and
the plan are plain Python (workflow/config_checks.py, workflow/plan.py) and are tested in-process;
the tests marked `workflow` show the same through a real `snakemake -n`."""

import copy
import dataclasses
import json
import re
import sys

import pytest
import yaml

import models.attention as xattn
from models.registry import model_class, model_names
from models.scan import PRECOMP_ENC_TYPES
from tests.helpers import REPO, planned, refusal, snakemake, tiny_config
from tests.test_workflow import planned_commands

PIPELINE_KEYS = {"arch", "train", "baseline", "aoq", "variants", "seeds"}


def model_entry_schema():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    return schema["definitions"]["model_entry"]


def arch_rules(arch):
    return next(
        rule["then"]
        for rule in model_entry_schema()["allOf"]
        if rule["if"]["properties"]["arch"]["const"] == arch
    )


def test_model_entries_mirror_the_registry():
    """The schema describes every shipped architecture, each exactly with its config's fields."""
    assert (
        sorted(rule["if"]["properties"]["arch"]["const"] for rule in model_entry_schema()["allOf"])
        == model_names()
    )
    for arch in model_names():
        assert model_class(arch).name == arch
        fields = {f.name for f in dataclasses.fields(model_class(arch).config_class)}
        keys = set(arch_rules(arch)["propertyNames"]["enum"])
        assert keys - PIPELINE_KEYS == fields - {"vocab_size", "img_dim"}, arch  # those come from the data


def test_value_enums_mirror_the_models():
    scan, bfan = arch_rules("scan")["properties"], arch_rules("bfan")["properties"]
    assert tuple(scan["cross_attn"]["enum"]) == xattn.DIRECTIONS
    assert tuple(scan["agg_func"]["enum"]) == xattn.AGG_FUNCS
    assert tuple(scan["raw_feature_norm"]["enum"]) == xattn.RAW_FEATURE_NORMS
    assert tuple(bfan["focal_type"]["enum"]) == xattn.FOCAL_TYPES
    assert (
        tuple(scan["precomp_enc_type"]["enum"])
        == tuple(bfan["precomp_enc_type"]["enum"])
        == PRECOMP_ENC_TYPES
    )


def test_the_miners_architectures_are_the_single_vector_models():
    sys.path.insert(0, str(REPO / "workflow"))
    import config_checks

    assert set(config_checks.mining_architectures()) == {
        a for a in model_names() if model_class(a).single_vector
    }
    assert config_checks.mining_architectures() == ("vsepp", "vsrn")


def bad(change):
    config = tiny_config()
    change(config)
    return config


def deep_set(config, key, value):
    *parents, last = key.split(".")
    for part in parents:
        config = config[part]
    config[last] = value


REFUSALS = {
    "unknown variant": (
        lambda c: deep_set(c, "aoq.variants", ["offtri", "offtripple"]),
        "config: aoq.variants: unknown loss variant 'offtripple' (models/variants.py has offtri, ",
    ),
    "unknown top-level key": (
        lambda c: c.update(evaluations=[]),
        "config: (top level): unknown key 'evaluations'",
    ),
    "unknown model key": (
        lambda c: deep_set(c, "models.vsepp.embed_sise", 3),
        "config: models.vsepp: unknown key 'embed_sise'",
    ),
    "key of another arch": (
        lambda c: deep_set(c, "models.vsepp.focal_type", "prob"),
        "config: models.vsepp: unknown key 'focal_type'",
    ),
    "unknown training key in a model": (
        lambda c: deep_set(c, "models.vsepp.aoq", {"train": {"lr_updat": 3}}),
        "config: models.vsepp.aoq.train: unknown key 'lr_updat'",
    ),
    "negative beta": (lambda c: deep_set(c, "aoq.loss.beta", -3), "config: aoq.loss.beta: -3 is less than"),
    "zero alpha": (lambda c: deep_set(c, "aoq.loss.alpha", 0), "config: aoq.loss.alpha: 0 is less than"),
    "negative margin": (
        lambda c: deep_set(c, "aoq.loss.margin_online", -0.1),
        "config: aoq.loss.margin_online:",
    ),
    "miner not a model": (
        lambda c: deep_set(c, "mining.model", "vsrn"),
        "config: mining.model: 'vsrn' is not an entry of `models:`",
    ),
    "miner cannot mine": (
        lambda c: c["models"].update(vsepp={"arch": "scan"}),
        "config: mining.model: 'vsepp' is a scan model",
    ),
    "miner seed not trained": (
        lambda c: deep_set(c, "mining.seed", 3),
        "config: mining.seed: 3 is not a seed",
    ),
    "run.models unknown": (
        lambda c: deep_set(c, "run.models", ["vsepp", "vsrn"]),
        "config: run.models: 'vsrn' is not an entry of `models:`",
    ),
    "bad device": (lambda c: deep_set(c, "run.device", "gpu"), "config: run.device: 'gpu' does not match"),
    "offline_size above k_i2t": (
        lambda c: deep_set(c, "aoq.train.offline_size", 31),
        "config: aoq.train.offline_size: 31 (model vsepp) draws from the top 31 i2t",
    ),
    "offline_size above 5 k_t2i": (
        lambda c: deep_set(c, "mining.k_t2i", 3),
        "config: aoq.train.offline_size: 20 (model vsepp) draws from the top 4 t2i",
    ),
    "k_i2t above the split": (
        lambda c: c["mining"].update(k_i2t=196),
        "config: mining.k_i2t: 196, but an image of the 40-image training split",
    ),
    "k_t2i above the split": (
        lambda c: c["mining"].update(k_t2i=40),
        "config: mining.k_t2i: 40, but a caption of the 40-image training split",
    ),
    "later rounds without an AdapOffQuin miner": (
        lambda c: c["mining"].update(rounds=2) or deep_set(c, "aoq.variants", ["offtri"]),
        "config: mining.rounds: later rounds mine with the adapoffquin run of 'vsepp', which it does not",
    ),
    "a seed the round-2 miner lacks": (
        lambda c: (
            c["mining"].update(rounds=2)
            or c["models"].update(vsepp2={"arch": "vsepp", "embed_size": 16, "word_dim": 8, "seeds": [0, 1]})
        ),
        "config: mining.rounds: model 'vsepp2' trains seeds [0, 1], but the round-2 miner 'vsepp' only [0]",
    ),
    "unknown exclusion": (
        lambda c: deep_set(c, "mining.exclude", "captions"),
        "config: mining.exclude: 'captions' is not one of",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_configs_are_refused_in_one_line_naming_the_key(tmp_path, case):
    change, expected = REFUSALS[case]
    line = refusal(bad(change), tmp_path)
    assert line is not None and line.startswith(expected), line
    assert "\n" not in line


@pytest.mark.workflow
@pytest.mark.parametrize("case", ["unknown model key", "offline_size above 5 k_t2i"])
def test_snakemake_prints_the_refusal_as_its_last_line_without_a_traceback(tmp_path, case):
    change, expected = REFUSALS[case]
    result = snakemake(tmp_path, bad(change), "-n")
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.splitlines()[-1].startswith(expected), output[-2000:]
    assert "Traceback" not in output and 'File "' not in output, output[-2000:]


def test_the_largest_consistent_k_is_accepted(tmp_path):
    config = tiny_config()
    config["mining"].update(k_i2t=195, k_t2i=39)
    assert refusal(config, tmp_path) is None
    config["mining"].update(k_i2t=196)
    assert refusal(config, tmp_path) is not None


def train_configs(result):
    """(model, variant) -> the --train-config JSON of each planned training job."""
    out = {}
    for _, command in planned_commands(result)["train"]:
        model = re.search(r"--resume-dir results/\.resume/\w+/(\w+)/(\w+)/seed", command).groups()
        out[model] = json.loads(re.search(r"--train-config '([^']*)'", command).group(1))
    return out


def train_sections(config):
    """(model, method) -> the training section each planned run gets (its --train-config)."""
    plan = planned(config)
    return {(m, v): plan.train_section(m, v) for m, v, _ in plan.trained_runs()}


@pytest.mark.parametrize("preset", ["f30k", "coco"])
def test_bfan_aoq_runs_use_the_releases_lr_update(preset):
    """The presets' models and schedules on the tiny demo DAG: BFAN's baseline keeps its own step
    (15), its AOQ runs take the AOQ release's 10; the model's other settings reach both rounds."""
    overlay = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
    config = tiny_config()
    config["models"] = copy.deepcopy(overlay["models"])
    config["run"]["models"] = ["vsrn", "bfan_equal"]
    config["mining"].update(model="vsrn")
    config["baseline"] = overlay["baseline"]
    config["aoq"]["train"] = overlay["aoq"]["train"] | {"offline_size": 20}
    trains = train_sections(config)
    expected_epochs = 15 if preset == "f30k" else 20
    assert trains[("bfan_equal", "baseline")]["lr_update"] == 15
    for variant in config["aoq"]["variants"]:
        assert trains[("bfan_equal", variant)]["lr_update"] == 10
        assert trains[("bfan_equal", variant)]["epochs"] == expected_epochs
        assert trains[("vsrn", variant)]["lr_update"] == 10
    assert trains[("bfan_equal", "baseline")]["epochs"] == expected_epochs


def model_level_overrides():
    config = tiny_config()
    config["models"]["vsepp"].update(
        train={"learning_rate": 0.01},
        baseline={"train": {"epochs": 3}},
        aoq={"train": {"epochs": 2, "learning_rate": 0.02}},
    )
    return config


def check_model_level_overrides(config, trains):
    assert (trains[("vsepp", "baseline")]["epochs"], trains[("vsepp", "baseline")]["learning_rate"]) == (
        3,
        0.01,
    )
    for variant in config["aoq"]["variants"]:
        assert (trains[("vsepp", variant)]["epochs"], trains[("vsepp", variant)]["learning_rate"]) == (
            2,
            0.02,
        )


def test_model_level_round_overrides_reach_only_their_round():
    config = model_level_overrides()
    check_model_level_overrides(config, train_sections(config))


@pytest.mark.workflow
def test_the_train_rule_passes_each_runs_section(tmp_path):
    """The same through a real dry run: the --train-config of every planned training command."""
    config = model_level_overrides()
    check_model_level_overrides(config, train_configs(snakemake(tmp_path, config, "-n", "-p")))


def test_schema_defaults_agree_with_the_steps_own_defaults():
    """A step run by hand and the workflow default the same way (the schema fills the workflow's)."""
    from pipeline_steps import make_demo_data, mine_candidates, prepare_data, train

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]
    mining = props["mining"]["properties"]
    mine_args = mine_candidates.parse_args(["--embeddings", "e", "--out-i2t", "i", "--out-t2i", "t"])
    assert (mine_args.block_mb, mine_args.dtype) == (
        mining["block_mb"]["default"],
        mining["dtype"]["default"],
    )
    dataset = props["dataset"]["properties"]
    prep = prepare_data.parse_args(["--data", "d", "--out", "o", "--img-dim", "4"])
    assert (prep.vocab_threshold, prep.tokenizer) == (
        dataset["vocab_threshold"]["default"],
        dataset["tokenizer"]["default"],
    )
    demo = props["demo"]["properties"]
    demo_args = make_demo_data.parse_args(["--out", "o"])
    for knob in ("near_duplicates", "duplicate_changes", "caption_detail"):
        assert getattr(demo_args, knob) == demo[knob]["default"], knob
    aoq_train = props["aoq"]["properties"]["train"]["allOf"][1]["properties"]
    assert train.TrainConfig().offline_size == aoq_train["offline_size"]["default"]
    assert (
        props["run"]["properties"]["device"]["default"]
        == train.parse_args(
            [
                "--data",
                "d",
                "--prepared",
                "p",
                "--model",
                "m",
                "--out-best",
                "b",
                "--out-last",
                "l",
                "--out-log",
                "v",
                "--resume-dir",
                "r",
            ]
        ).device
    )


@pytest.mark.workflow
def test_authors_candidates_without_any_aoq_run_plan_cleanly(tmp_path):
    """Only baselines, with mining.candidate_files set: the files are adopted (checked), no crash."""
    config = tiny_config()
    files = {k: tmp_path / f"{k}_demo.npy" for k in ("i2t", "t2i")}
    for path in files.values():
        path.write_bytes(b"")
    config["mining"]["candidate_files"] = {k: str(v) for k, v in files.items()}
    config["aoq"]["variants"] = []
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]


@dataclasses.dataclass
class ToyConfig:
    vocab_size: int = 0
    img_dim: int = 0
    embed_size: int = 8
    gain: float = 1.0
    mode: str = "a"
    flag: bool = False


class Toy:
    config_class = ToyConfig


@pytest.mark.parametrize(
    "entry,expected",
    [
        ({}, None),
        ({"gain": 2, "mode": "b", "flag": True}, None),  # an int is a float
        ({"gian": 2.0}, "config: models.toy: unknown key 'gian'"),
        ({"gain": "high"}, "config: models.toy.gain: 'high' is not a float"),
        ({"gain": True}, "config: models.toy.gain: True is not a float"),
        ({"flag": 1}, "config: models.toy.flag: 1 is not a bool"),
        ({"mode": 3}, "config: models.toy.mode: 3 is not a str"),
        ({"vocab_size": 5}, "config: models.toy: unknown key 'vocab_size'"),  # comes from the data
    ],
)
def test_an_architecture_without_a_schema_block_is_checked_against_its_config(monkeypatch, entry, expected):
    """In-process twin of tests/test_new_architecture.py: a registered architecture the schema does
    not describe has its entry's keys and value types checked against its config dataclass."""
    from models import registry

    monkeypatch.setitem(registry.ARCHITECTURES, "toy", registry.Architecture("tests.test_config:Toy", True))
    config = tiny_config()
    config["models"] = {"toy": {"arch": "toy", "embed_size": 16, **entry}}
    config["mining"]["model"] = "toy"  # a registered single-vector architecture mines
    line = refusal(config)
    assert line == expected if expected is None else line.startswith(expected), line
    unregistered = tiny_config()
    unregistered["models"]["vsepp"]["arch"] = "vsep"
    assert refusal(unregistered).startswith(
        "config: models.vsepp.arch: 'vsep' is not a registered architecture"
    )
