import json

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
    evaluation="|".join(e["name"] for e in config["evaluation"]),


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


def evaluation_by_name(name):
    return next(e for e in config["evaluation"] if e["name"] == name)


def report_outputs():
    return [f"{R}/report/report.md", f"{R}/report/report.csv", f"{R}/report/curves.png"]
