"""The configuration's checks, in plain Python (no Snakemake): rules/validate.smk runs them when
Snakemake starts, after the schema (which fills in its defaults), and tests call them directly.

A refusal is a ConfigError whose text is one line naming the key: `config: <key>: <problem>`.
What is checked here and not by the schema: numbers (whole numbers for integer keys, no NaN or
Inf anywhere), names that must be unique, and the rules that span several keys.
"""

import dataclasses
import json
import math
import typing
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import best_match
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from models.registry import ARCHITECTURES, embedding_models, model_class, model_names


def mining_architectures():
    """Architectures with one vector per image and caption, the only ones that can mine
    candidates: a field of the registry, read when a config is checked (tests/test_config.py
    checks it against each model's `single_vector`)."""
    return tuple(embedding_models())


# Refreshed mining rounds (docs/mining_audit.md): round r >= 2 mines with the round r-1 run of
# this method.
ROUND_MINER = "adapoffquin"
CAPTIONS_PER_IMAGE = 5


class ConfigError(Exception):
    def __init__(self, key, problem):
        super().__init__(f"config: {key}: {problem}")


def refuse(key, problem):
    raise ConfigError(key, problem)


# --- numbers -------------------------------------------------------------------------------------


def _is_integer(checker, instance):
    """JSON Schema counts 2.0 as an integer; a config key that counts things does not."""
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(checker, instance):
    if isinstance(instance, bool) or not isinstance(instance, (int, float)):
        return False
    return math.isfinite(instance)


StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number}
    ),
)


def non_finite(value, path=()):
    """(key, value) of the first NaN or Inf anywhere in `value`, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".".join(map(str, path)) or "(top level)", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite(item, (*path, key))
        if found:
            return found
    return None


def schema_key(error):
    return ".".join(map(str, error.absolute_path)) or "(top level)"


def check_schema_strictly(config, schema):
    """The schema again with strict numbers: 2.0 is not an integer, NaN and Inf are no number."""
    found = non_finite(config)
    if found:
        refuse(found[0], f"must be a finite number, not {found[1]}")
    error = best_match(StrictValidator(schema).iter_errors(config))
    if error is None:
        return
    if (
        error.validator == "type"
        and isinstance(error.instance, float)
        and "integer" in str(error.validator_value)
    ):
        refuse(schema_key(error), f"must be a whole number, not {error.instance!r}")
    refuse(schema_key(error), describe(error))


def describe(error):
    """One line for a schema violation (unknown keys named)."""
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return "unknown key " + ", ".join(map(repr, extra))
    if "propertyNames" in error.schema_path and error.validator == "enum":
        return f"unknown key {error.instance!r} (known here: {', '.join(error.validator_value)})"
    return " ".join(error.message.split())


def refuse_schema_violation(config, schema):
    """The most relevant violation of the (Snakemake-validated) schema, as a ConfigError."""
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    refuse(schema_key(error), describe(error))


# --- what the configuration runs (read by the checks and by the rules) -------------------------


def seeds_of(config, model):
    return config["models"][model].get("seeds", config["run"]["seeds"])


def round_method(variant, round_):
    return variant if round_ == 1 else f"{variant}_round{round_}"


def method_round(method):
    """(loss variant, mining round) of a method name: adapoffquin_round2 -> (adapoffquin, 2)."""
    variant, _, round_ = method.partition("_round")
    return variant, int(round_) if round_ else 1


def variants_of(config, model):
    """'baseline', then the model's AOQ methods, round by round."""
    aoq = config["models"][model].get("variants", config["aoq"]["variants"])
    rounds = config["mining"]["rounds"]
    return ["baseline"] + [round_method(v, r) for r in range(1, rounds + 1) for v in aoq]


def train_section(config, model, variant):
    """The training settings of a run: the round's section (baseline or aoq), then the model's
    `train:` (both rounds), then the model's own `baseline: {train}` or `aoq: {train}`."""
    round_ = "baseline" if variant == "baseline" else "aoq"
    entry = config["models"][model]
    return config[round_]["train"] | entry.get("train", {}) | entry.get(round_, {}).get("train", {})


def selected_models(config):
    return config["run"].get("models", list(config["models"]))


def split_images(config, split, workdir="."):
    """Images of a split, when known before anything runs (else None): from the demo settings,
    the prepared manifest, or (before the first prepare_data) the caption file."""
    demo = config["demo"]
    if demo["enabled"]:
        per_split = {
            "train": demo["n_train"],
            "dev": demo["n_dev"],
            "test": demo["n_test"],
            "testall": 5 * demo["n_testall_per_fold"],
        }
        return per_split.get(split)
    manifest = Path(workdir) / "results" / config["dataset"]["name"] / "prepared" / "manifest.json"
    if manifest.is_file():
        splits = json.loads(manifest.read_text())["splits"]
        return splits[split]["n_images"] if split in splits else None
    captions = Path(workdir) / config["dataset"]["path"] / f"{split}_caps.txt"
    if captions.is_file():
        with open(captions, "rb") as handle:
            return sum(1 for _ in handle) // CAPTIONS_PER_IMAGE
    return None


# --- the checks ----------------------------------------------------------------------------------


def check_unique(config):
    """Names that are keys of results and seeds that are runs appear once."""
    lists = {
        "run.seeds": config["run"]["seeds"],
        "run.ensemble_seeds": config["run"]["ensemble_seeds"],
        "run.models": config["run"].get("models", []),
        "aoq.variants": config["aoq"]["variants"],
        "dataset.splits": config["dataset"]["splits"],
        "evaluation": [e["name"] for e in config["evaluation"]],
    }
    for name, entry in config["models"].items():
        for key in ("seeds", "variants"):
            if key in entry:
                lists[f"models.{name}.{key}"] = entry[key]
    for name, members in config["ensembles"].items():
        lists[f"ensembles.{name}"] = members
    for name, members in config["released"]["ensembles"].items():
        lists[f"released.ensembles.{name}"] = members
    for key, values in lists.items():
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            what = "evaluation name" if key == "evaluation" else "entry"
            refuse(
                key, f"{what} {repeated[0]!r} appears twice (each must be unique: results are named by it)"
            )


def check_variants(config, loss_variants):
    aoq = [v for v in loss_variants if v != "baseline"]
    lists = {"aoq.variants": config["aoq"]["variants"]}
    lists.update(
        {
            f"models.{name}.variants": entry["variants"]
            for name, entry in config["models"].items()
            if "variants" in entry
        }
    )
    for key, variants in lists.items():
        for variant in variants:
            if variant not in aoq:
                refuse(key, f"unknown loss variant {variant!r} (models/variants.py has {', '.join(aoq)})")


# Keys of a model entry that are the pipeline's, not the architecture's config, and the config
# fields that come from the data.
PIPELINE_KEYS = ("arch", "train", "baseline", "aoq", "variants", "seeds")
FROM_THE_DATA = ("vocab_size", "img_dim")
FIELD_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


def schema_architectures(schema):
    """The architectures whose keys the schema describes (its per-architecture blocks)."""
    return {
        rule["if"]["properties"]["arch"]["const"] for rule in schema["definitions"]["model_entry"]["allOf"]
    }


def check_entry_against_its_config(name, entry):
    """An entry of an architecture the schema does not describe: its keys and their types against
    the architecture's config dataclass (imported only here, for such an architecture)."""
    config_class = model_class(entry["arch"]).config_class
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.name not in FROM_THE_DATA}
    hints = typing.get_type_hints(config_class)
    for key, value in entry.items():
        if key in PIPELINE_KEYS:
            continue
        if key not in fields:
            refuse(
                f"models.{name}", f"unknown key {key!r} (known here: {', '.join([*PIPELINE_KEYS, *fields])})"
            )
        allowed = FIELD_TYPES.get(hints[key])  # other annotations (unions, ...) are left to the model
        if allowed and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool))):
            refuse(f"models.{name}.{key}", f"{value!r} is not a {hints[key].__name__}")


def check_models(config, schema):
    models = config["models"]
    described = schema_architectures(schema)
    for name, entry in models.items():
        if entry["arch"] not in ARCHITECTURES:
            refuse(
                f"models.{name}.arch",
                f"{entry['arch']!r} is not a registered architecture "
                f"(models/registry.py: {', '.join(model_names())})",
            )
        if entry["arch"] not in described:
            check_entry_against_its_config(name, entry)
    for name in config["run"].get("models", []):
        if name not in models:
            refuse("run.models", f"{name!r} is not an entry of `models:` ({', '.join(models)})")
    for name, members in config["ensembles"].items():
        if name in models or not set(members) <= set(models):
            refuse(
                f"ensembles.{name}",
                "an ensemble must not reuse a model name and may only list "
                f"entries of `models:` (got {members})",
            )
    released = config["released"]
    for name, members in released["ensembles"].items():
        if not set(members) <= set(released["checkpoints"]):
            refuse(
                f"released.ensembles.{name}", f"may only list entries of released.checkpoints (got {members})"
            )
    taken = set(models) | set(config["ensembles"])
    for name in set(released["checkpoints"]) | set(released["ensembles"]):
        if name in taken:
            refuse(
                f"released: {name}",
                "a released checkpoint or ensemble must not reuse the name of a model "
                "or ensemble (their metrics share results/<dataset>/eval/<name>/)",
            )


def check_mining(config, workdir="."):
    """The miner exists and can mine; K covers what AOQ training draws and what the split has."""
    models, mining = config["models"], config["mining"]
    selected = selected_models(config)
    aoq = [name for name in selected if variants_of(config, name)[1:]]
    if not aoq or mining["candidate_files"]:
        return
    miner = mining["model"]
    if miner not in models:
        refuse("mining.model", f"{miner!r} is not an entry of `models:` ({', '.join(models)})")
    if miner not in selected:
        refuse("mining.model", f"{miner!r} mines the candidates, so it must be among run.models")
    if models[miner]["arch"] not in mining_architectures():
        refuse(
            "mining.model",
            f"{miner!r} is a {models[miner]['arch']} model; mining needs one "
            f"vector per item ({' or '.join(mining_architectures())})",
        )
    if mining["seed"] not in seeds_of(config, miner):
        refuse("mining.seed", f"{mining['seed']} is not a seed of {miner!r} ({seeds_of(config, miner)})")
    for name in aoq:
        size = train_section(config, name, "aoq")["offline_size"]
        key = "aoq.train.offline_size"
        if size > mining["k_i2t"]:
            refuse(
                key,
                f"{size} (model {name}) draws from the top {size} i2t candidates, but "
                f"mining.k_i2t keeps {mining['k_i2t']}",
            )
        if math.ceil(size / 5) > mining["k_t2i"]:
            refuse(
                key,
                f"{size} (model {name}) draws from the top {math.ceil(size / 5)} t2i "
                f"candidates, but mining.k_t2i keeps {mining['k_t2i']}",
            )
    n_train = split_images(config, "train", workdir)
    if n_train is not None:
        if mining["k_i2t"] > 5 * (n_train - 1):
            refuse(
                "mining.k_i2t",
                f"{mining['k_i2t']}, but an image of the {n_train}-image "
                f"training split has only {5 * (n_train - 1)} captions besides its own",
            )
        if mining["k_t2i"] > n_train - 1:
            refuse(
                "mining.k_t2i",
                f"{mining['k_t2i']}, but a caption of the {n_train}-image "
                f"training split has only {n_train - 1} other images",
            )


def check_rounds(config):
    """Round r >= 2 mines with the mining model's AdapOffQuin run of each seed it trains."""
    mining = config["mining"]
    if mining["rounds"] == 1:
        if mining["warm_start"]:
            refuse("mining.warm_start", "true has no effect with mining.rounds 1 (no later round to start)")
        return
    models, miner = config["models"], mining["model"]
    selected = selected_models(config)
    if miner not in selected or models[miner]["arch"] not in mining_architectures():
        refuse(
            "mining.rounds",
            f"later rounds mine with mining.model, which must be a selected {mining_architectures()} model",
        )
    if ROUND_MINER not in variants_of(config, miner):
        refuse(
            "mining.rounds",
            f"later rounds mine with the {ROUND_MINER} run of {miner!r}, which it does not train",
        )
    for name in selected:
        if variants_of(config, name)[1:] and not set(seeds_of(config, name)) <= set(seeds_of(config, miner)):
            refuse(
                "mining.rounds",
                f"model {name!r} trains seeds {seeds_of(config, name)}, "
                f"but the round-2 miner {miner!r} only {seeds_of(config, miner)}",
            )


def check_start(config):
    """AOQ runs can start from the baseline's warm-up only where the baseline warms up."""
    if config["aoq"]["start_from"] != "baseline_warmup":
        return
    for name in selected_models(config):
        if variants_of(config, name)[1:] and not train_section(config, name, "baseline").get(
            "max_violation_warmup_epochs", 0
        ):
            refuse(
                "aoq.start_from",
                f"baseline_warmup, but the baseline of model {name!r} has no warm-up "
                "(its max_violation_warmup_epochs is 0)",
            )


def check_download(config):
    if not config["download"]["enabled"]:
        return
    if config["demo"]["enabled"]:
        refuse("download.enabled", "demo.enabled and download.enabled exclude each other")
    extract, path = config["download"]["extract"], config["dataset"]["path"]
    if Path(extract.rstrip("/")).name != Path(path).name:
        refuse(
            "download.extract", f"must end in the dataset folder of dataset.path ({extract!r} vs {path!r})"
        )


def check_dataset(config, workdir="."):
    dataset = config["dataset"]
    if dataset["vocab_json"] and dataset["vocab_pkl"]:
        refuse("dataset.vocab_json", "and dataset.vocab_pkl are both set: give one vocabulary")
    for key in ("vocab_json", "vocab_pkl"):
        if dataset[key] and not (Path(workdir) / dataset[key]).is_file():
            refuse(f"dataset.{key}", f"{dataset[key]!r} is not a file")


def check_evaluations(config, workdir="."):
    splits = config["dataset"]["splits"]
    for i, evaluation in enumerate(config["evaluation"]):
        name, split = evaluation["name"], evaluation["split"]
        if split not in splits:
            refuse(
                f"evaluation.{i}.split",
                f"{split!r} ({name}) is not among dataset.splits ({', '.join(splits)})",
            )
        if evaluation["protocol"] == "5fold":
            n_img = split_images(config, split, workdir)
            if n_img is not None and (n_img < 5 or n_img % 5):
                refuse(
                    f"evaluation.{i}.protocol",
                    f"5fold ({name}) needs a multiple of 5 images, but split {split} has {n_img}",
                )


def check(config, schema, loss_variants, workdir="."):
    """Every check, in order; `config` has passed the schema and holds its defaults."""
    check_schema_strictly(config, schema)
    check_unique(config)
    check_variants(config, loss_variants)
    check_models(config, schema)
    check_dataset(config, workdir)
    check_evaluations(config, workdir)
    check_mining(config, workdir)
    check_rounds(config)
    check_start(config)
    check_download(config)


def validated(config, schema_path, loss_variants, workdir="."):
    """Check `config` as Snakemake starts: the schema (filling in its defaults, in place), then
    every check above. Raises ConfigError."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    try:
        validate(config, str(schema_path), set_default=True)
    except WorkflowError:
        refuse_schema_violation(config, schema)
    check(config, schema, loss_variants, workdir)
