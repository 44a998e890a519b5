import json
import os
import sys

# Steps run as `python -m pipeline_steps.<step>`: make the repository importable whatever the
# working directory (snakemake --directory, cluster jobs), and let `python` be the interpreter
# that runs Snakemake (e.g. .venv/bin/snakemake without an activated venv). A rule's conda
# environment (--sdm conda) still comes first, since activating it prepends its own bin folder.
REPO = os.path.abspath(os.path.join(workflow.basedir, ".."))
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.getenv("PYTHONPATH")])),
    PATH=os.pathsep.join([os.path.dirname(sys.executable), os.getenv("PATH", "")]),
)

DATASET = config["dataset"]["name"]
DATA = config["dataset"]["path"]
R = f"results/{DATASET}"
PREPARED = f"{R}/prepared"
# Offline candidate files are named after the dataset prefix, as the authors' (i2t_coco.npy).
DS_PREFIX = DATASET.split("_")[0]
VARIANTS = ["baseline"] + config["aoq"]["variants"]
SEEDS = config["run"]["seeds"]
MODELS = list(config["models"])


wildcard_constraints:
    model="|".join(MODELS),
    variant="|".join(VARIANTS),
    seed=r"\d+",


def split_inputs(*splits):
    """What a step reads of the data: features and cached ids of `splits`, and the manifest."""
    return {
        "ims": [f"{DATA}/{s}_ims.npy" for s in splits],
        "ids": [f"{PREPARED}/{s}_ids.npz" for s in splits],
        "manifest": f"{PREPARED}/manifest.json",
    }


def data_dir(wildcards, input):
    return os.path.dirname(input.ims[0])


def prepared_dir(wildcards, input):
    return os.path.dirname(input.manifest)


def as_json(value):
    return json.dumps(value, sort_keys=True)


def train_dir(model="{model}", variant="{variant}", seed="{seed}"):
    return f"{R}/train/{model}/{variant}/seed{seed}"


def checkpoint_path(model, variant, seed):
    return f"{train_dir(model, variant, seed)}/model_best.pt"


def miner_candidates():
    """The i2t / t2i files every AOQ run trains with (mined by the configured baseline)."""
    m = config["mining"]
    folder = f"{R}/candidates/{m['model']}/seed{m['seed']}"
    return {"i2t": f"{folder}/i2t_{DS_PREFIX}.npy", "t2i": f"{folder}/t2i_{DS_PREFIX}.npy"}


def train_section(variant):
    return config["baseline"]["train"] if variant == "baseline" else config["aoq"]["train"]


def loss_section(variant):
    # The baseline gets only its own margin, so AOQ hyperparameters never rerun it.
    if variant == "baseline":
        return {"variant": "baseline", "margin_online": config["baseline"].get("margin", 0.2)}
    return {"variant": variant, **config["aoq"]["loss"]}


def train_inputs(wildcards):
    inputs = split_inputs("train", "dev")
    if wildcards.variant != "baseline":
        inputs.update(miner_candidates())
    return inputs


def candidate_flags(wildcards, input):
    if wildcards.variant == "baseline":
        return ""
    return f"--candidates-i2t {input.i2t} --candidates-t2i {input.t2i}"


def evaluation_by_name(name):
    return next(e for e in config["evaluation"] if e["name"] == name)


def report_outputs():
    return [f"{R}/report/report.md", f"{R}/report/report.csv", f"{R}/report/curves.png"]
