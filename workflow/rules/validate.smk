# The configuration is checked before anything is planned: first against the schema (which also
# fills in its defaults), then the rules that span several keys. A refusal is one line naming the
# key (`config: <key>: <problem>`), printed without a traceback.
import ast
import json
import math
import sys
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from snakemake.exceptions import WorkflowError

# Architectures with one vector per image and caption, the only ones that can mine candidates
# (tests/test_config.py checks this against the models' `single_vector`).
EMBEDDING_ARCHS = ("vsepp", "vsrn")


def loss_variants():
    """The loss variants in the paper's order: the keys of VARIANTS in models/losses.py, the one
    list of them, read without importing it (the workflow itself needs no torch)."""
    source = Path(workflow.basedir).parent / "models" / "losses.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "VARIANTS":
            return [ast.literal_eval(key) for key in node.value.keys]
    raise WorkflowError(f"{source}: no VARIANTS table found")


LOSS_VARIANTS = loss_variants()


def refuse(key, problem):
    sys.exit(f"config: {key}: {problem}")


def refuse_schema_violation(schema_path):
    """The most relevant schema violation, as one line naming its key."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    key = ".".join(map(str, error.absolute_path)) or "(top level)"
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        refuse(key, "unknown key " + ", ".join(map(repr, extra)))
    if "propertyNames" in error.schema_path and error.validator == "enum":
        refuse(key, f"unknown key {error.instance!r} (known here: {', '.join(error.validator_value)})")
    refuse(key, error.message)


try:
    validate(config, "../schemas/config.schema.yaml", set_default=True)
except WorkflowError:
    refuse_schema_violation(Path(workflow.current_basedir) / "../schemas/config.schema.yaml")


# A model's seeds, methods and training settings: the checks below and the rules (common.smk)
# read them through these.
def seeds_of(model):
    return config["models"][model].get("seeds", config["run"]["seeds"])


# Refreshed mining rounds (mining.rounds, docs/mining_audit.md): round r >= 2 trains every AOQ
# method again on candidates mined by the round r-1 AdapOffQuin model of the same seed; its
# runs are methods of their own, <variant>_round<r>, beside the round-1 ones.
MINING_ROUNDS = config["mining"]["rounds"]
ROUND_MINER = "adapoffquin"


def round_method(variant, round_):
    return variant if round_ == 1 else f"{variant}_round{round_}"


def method_round(method):
    """(loss variant, mining round) of a method name: adapoffquin_round2 -> (adapoffquin, 2)."""
    variant, _, round_ = method.partition("_round")
    return variant, int(round_) if round_ else 1


def variants_of(model):
    """ "baseline", then the model's AOQ methods, round by round."""
    aoq = config["models"][model].get("variants", config["aoq"]["variants"])
    return ["baseline"] + [round_method(v, r) for r in range(1, MINING_ROUNDS + 1) for v in aoq]


def train_section(model, variant):
    """The training settings of a run: the round's section (baseline or aoq), then the model's
    `train:` (both rounds), then the model's own `baseline: {train}` or `aoq: {train}`."""
    round_ = "baseline" if variant == "baseline" else "aoq"
    entry = config["models"][model]
    return config[round_]["train"] | entry.get("train", {}) | entry.get(round_, {}).get("train", {})


def _training_images():
    """Images of the training split, when known before anything runs (else None): from the demo
    settings, the prepared manifest, or (before the first prepare_data) the caption file."""
    if config["demo"]["enabled"]:
        return config["demo"]["n_train"]
    manifest = Path("results") / config["dataset"]["name"] / "prepared" / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["splits"]["train"]["n_images"]
    captions = Path(config["dataset"]["path"]) / "train_caps.txt"
    if captions.is_file():
        with open(captions, "rb") as handle:
            return sum(1 for _ in handle) // 5
    return None


def check_variants():
    aoq = [v for v in LOSS_VARIANTS if v != "baseline"]
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
                refuse(key, f"unknown loss variant {variant!r} (models/losses.py has {', '.join(aoq)})")


def check_models():
    models = config["models"]
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


def check_mining():
    """The miner exists and can mine; K covers what AOQ training draws and what the split has."""
    models, mining = config["models"], config["mining"]
    selected = config["run"].get("models", list(models))
    aoq = [name for name in selected if variants_of(name)[1:]]
    if not aoq or mining["candidate_files"]:
        return
    miner = mining["model"]
    if miner not in models:
        refuse("mining.model", f"{miner!r} is not an entry of `models:` ({', '.join(models)})")
    if miner not in selected:
        refuse("mining.model", f"{miner!r} mines the candidates, so it must be among run.models")
    if models[miner]["arch"] not in EMBEDDING_ARCHS:
        refuse(
            "mining.model",
            f"{miner!r} is a {models[miner]['arch']} model; mining needs one "
            f"vector per item ({' or '.join(EMBEDDING_ARCHS)})",
        )
    if mining["seed"] not in seeds_of(miner):
        refuse("mining.seed", f"{mining['seed']} is not a seed of {miner!r} ({seeds_of(miner)})")
    for name in aoq:
        size = train_section(name, "aoq")["offline_size"]
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
    n_train = _training_images()
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


def check_rounds():
    """Round r >= 2 mines with the mining model's AdapOffQuin run of each seed it trains."""
    if MINING_ROUNDS == 1:
        return
    models, miner = config["models"], config["mining"]["model"]
    selected = config["run"].get("models", list(models))
    if miner not in selected or models[miner]["arch"] not in EMBEDDING_ARCHS:
        refuse(
            "mining.rounds",
            f"later rounds mine with mining.model, which must be a selected {EMBEDDING_ARCHS} model",
        )
    if ROUND_MINER not in variants_of(miner):
        refuse(
            "mining.rounds",
            f"later rounds mine with the {ROUND_MINER} run of {miner!r}, which it does not train",
        )
    for name in selected:
        if variants_of(name)[1:] and not set(seeds_of(name)) <= set(seeds_of(miner)):
            refuse(
                "mining.rounds",
                f"model {name!r} trains seeds {seeds_of(name)}, but the round-2 miner {miner!r} only {seeds_of(miner)}",
            )


def check_download():
    if not config["download"]["enabled"]:
        return
    if config["demo"]["enabled"]:
        refuse("download.enabled", "demo.enabled and download.enabled exclude each other")
    extract, path = config["download"]["extract"], config["dataset"]["path"]
    if Path(extract.rstrip("/")).name != Path(path).name:
        refuse(
            "download.extract", f"must end in the dataset folder of dataset.path ({extract!r} vs {path!r})"
        )


check_variants()
check_models()
check_mining()
check_rounds()
check_download()
