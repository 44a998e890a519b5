import hashlib
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
RESULTS = f"results/{DATASET}"  # this dataset's results folder
PREPARED = f"{RESULTS}/prepared"
# Offline candidate files are named after the dataset prefix, as the authors' (i2t_coco.npy).
DS_PREFIX = DATASET.split("_")[0]
# Model instances: name -> {arch: registered model, train / variants / seeds: overrides, ...config};
# run.models selects some of them (presets define many).
MODELS = {
    name: entry
    for name, entry in config["models"].items()
    if name in config["run"].get("models", config["models"])
}
# What evaluation scores: every model alone (the ensemble of its seeds) and the configured
# ensembles of several models (each with all its seeds), e.g. SCAN t-i AVG + i-t LSE; an ensemble
# with an unselected member is left out.
ENSEMBLES = {name: [name] for name in MODELS} | {
    name: members for name, members in config["ensembles"].items() if set(members) <= set(MODELS)
}
# Keys of a model entry that are the pipeline's, not the architecture's config.
MODEL_KEYS = ("arch", "train", "baseline", "aoq", "variants", "seeds")


# Released checkpoints (name -> {path, arch}) and the ensembles of them to evaluate; every
# checkpoint alone is an ensemble of one.
RELEASED = config["released"]["checkpoints"]
RELEASED_ENSEMBLES = {c: [c] for c in RELEASED} | config["released"]["ensembles"]


def ensemble_variants(name):
    """Methods every member of an ensemble was trained with, in the paper's order (then rounds)."""
    first, *others = ENSEMBLES[name]
    return [v for v in variants_of(first) if all(v in variants_of(m) for m in others)]


def common_seeds(name):
    """Seeds every member of `name` was trained with (a model alone: its seeds)."""
    members = ENSEMBLES[name]
    return [s for s in seeds_of(members[0]) if all(s in seeds_of(m) for m in members)]


def ensemble_seeds(name):
    """The seeds of `name`'s ensemble row (run.ensemble_seeds, where trained); none below two."""
    seeds = [s for s in common_seeds(name) if s in config["run"]["ensemble_seeds"]]
    return seeds if len(seeds) >= 2 else []


def evaluated_sets(name):
    """What is evaluated of `name` per method: each seed alone (seed<k>: that seed of every
    member), and the ensemble row of its ensemble seeds when there are two or more."""
    return [f"seed{s}" for s in common_seeds(name)] + (["ensemble"] if ensemble_seeds(name) else [])


def set_seeds(name, subset):
    return ensemble_seeds(name) if subset == "ensemble" else [int(subset.removeprefix("seed"))]


# Training methods: the loss variants, and later mining rounds' <variant>_round<r>.
METHODS = list(dict.fromkeys(LOSS_VARIANTS + [v for m in MODELS for v in variants_of(m)]))


wildcard_constraints:
    model="|".join(MODELS),
    subset=r"seed\d+|ensemble",
    ckpt="|".join(RELEASED) or "^$",
    variant="|".join(METHODS),
    seed=r"\d+",
    # The model that mines a candidate set, as a folder: empty for the round-1 baseline
    # (candidates/<model>/seed<k>/), "<method>/" for a later round's miner
    # (candidates/<model>/<method>/seed<k>/).
    miner="|".join([""] + [f"{v}/" for m in MODELS for v in variants_of(m)[1:]]),


# Job resources by class (config.yaml `resources`): memory, runtime, and for the GPU classes a
# `gpu` count. SLURM assigns the devices itself; a local run hands each job its own through a GPU
# slot, among resources.local_gpus devices (counted with nvidia-smi when null).
GPU_CLASSES = ("train", "extract", "mine", "evaluate")
if config["resources"]["local_gpus"] is not None:
    os.environ.update(AOQ_LOCAL_GPUS=str(config["resources"]["local_gpus"]))


def gpus_of(kind):
    gpus = config["resources"][kind]["gpus"]
    return config["resources"]["gpus_per_job"] if gpus is None else gpus


def job_resources(kind):
    """mem_mb, runtime (minutes) and, for a GPU class, gpu of one job."""
    resources = {k: config["resources"][kind][k] for k in ("mem_mb", "runtime")}
    if kind in GPU_CLASSES:
        resources["gpu"] = gpus_of(kind)
    return resources


# Commands are argument lists, and every field of a rule's shell command is quoted ({x:q}, one
# shell word per list element): no string from the config or a path reaches the shell as code,
# and paths with spaces or quotes work (tests/test_shell_quoting.py).
def step_command(kind, module):
    """The argv that runs `python -m <module>` for a job of class `kind`. Without GPUs it is
    just that; with GPUs it runs inside a GPU slot, and training on several GPUs runs torchrun,
    one process per GPU."""
    gpus = gpus_of(kind)
    if gpus == 0:
        return ["python", "-m", module]
    slot = ["python", "-m", "pipeline_steps.gpu_slot", "--gpus", str(gpus), "--"]
    if kind == "train" and gpus > 1:
        torchrun = ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        return slot + torchrun + ["-m", module]
    return slot + ["python", "-m", module]


def download_source_flags(wildcards):
    """Where the data comes from: an existing folder, an archive on disk, or the mirrors."""
    d = config["download"]
    if d["adopt_folder"]:
        return ["--adopt-folder", d["adopt_folder"], "--extract", d["extract"]]
    if d["adopt_archive"]:
        return ["--adopt-archive", d["adopt_archive"], "--extract", d["extract"]]
    return ["--urls", *d["urls"], "--archive", d["archive"], "--extract", d["extract"]]


def vocab_flags(wildcards):
    """A released vocabulary instead of building one: SCAN json or the VSRN/AOQ Python-2 pickle."""
    if config["dataset"]["vocab_json"]:
        return ["--vocab-json", config["dataset"]["vocab_json"]]
    if config["dataset"]["vocab_pkl"]:
        return ["--vocab-pkl", config["dataset"]["vocab_pkl"]]
    return []


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
    return f"{RESULTS}/train/{model}/{variant}/seed{seed}"


def checkpoint_path(model, variant, seed):
    return f"{train_dir(model, variant, seed)}/model_best.pt"


def round_miner(round_):
    """The method whose model mines round `round_` >= 2: the previous round's AdapOffQuin."""
    return round_method(ROUND_MINER, round_ - 1)


def candidate_folder(round_=1, seed=None):
    """Where a mining round's i2t / t2i files lie: round 1 by the configured baseline (one seed for
    every run) or the authors' files (mining.candidate_files) once checked; round r >= 2 by the
    same seed's round_miner(r)."""
    m = config["mining"]
    if round_ > 1:
        return f"{RESULTS}/candidates/{m['model']}/{round_miner(round_)}/seed{seed}"
    if m["candidate_files"]:
        return f"{RESULTS}/candidates/authors"
    return f"{RESULTS}/candidates/{m['model']}/seed{m['seed']}"


def miner_candidates(round_=1, seed=None):
    folder = candidate_folder(round_, seed)
    return {"i2t": f"{folder}/i2t_{DS_PREFIX}.npy", "t2i": f"{folder}/t2i_{DS_PREFIX}.npy"}


def miner_method(wildcards):
    """The method of the model that mines (or whose embeddings are) {miner}: baseline in round 1."""
    return wildcards.miner.rstrip(os.sep) or "baseline"


def audit_outputs():
    """The mining audit of every candidate set the configured runs train with."""
    m = config["mining"]
    seeds = sorted({s for name in MODELS if variants_of(name)[1:] for s in seeds_of(name)})
    # Nothing is mined when no run trains with offline candidates (a baseline-only config).
    folders = [] if m["candidate_files"] or not seeds else [candidate_folder()]
    folders += [candidate_folder(r, s) for r in range(2, MINING_ROUNDS + 1) for s in seeds]
    return [f"{folder}/audit.{ext}" for folder in folders for ext in ("json", "png")]


def model_config(model):
    return {k: v for k, v in MODELS[model].items() if k not in MODEL_KEYS}


def loss_section(method):
    # The baseline gets only its own margin, so AOQ hyperparameters never rerun it.
    variant, _ = method_round(method)
    if variant == "baseline":
        return {"variant": "baseline", "margin_online": config["baseline"]["margin"]}
    return {"variant": variant, **config["aoq"]["loss"]}


def warm_start_from(method):
    """The checkpoint method a later round starts from (mining.warm_start), or None."""
    variant, round_ = method_round(method)
    return round_method(variant, round_ - 1) if round_ > 1 and config["mining"]["warm_start"] else None


def train_inputs(wildcards):
    inputs = split_inputs("train", "dev")
    if wildcards.variant != "baseline":
        inputs.update(miner_candidates(method_round(wildcards.variant)[1], wildcards.seed))
    if warm_start_from(wildcards.variant):
        inputs["init"] = checkpoint_path(wildcards.model, warm_start_from(wildcards.variant), wildcards.seed)
    return inputs


def candidate_flags(wildcards, input):
    """Offline candidates of an AOQ run, and the checkpoint a later mining round starts from."""
    if wildcards.variant == "baseline":
        return []
    init = ["--init-from", input.init] if "init" in input.keys() else []
    return ["--candidates-i2t", input.i2t, "--candidates-t2i", input.t2i, *init]


def evaluation_flags(outputs):
    """--evaluation NAME SPLIT PROTOCOL OUT for every configured evaluation."""
    return [
        word
        for e, out in zip(config["evaluation"], outputs)
        for word in ("--evaluation", e["name"], e["split"], e["protocol"], out)
    ]


# Provenance. A rule's params hold a digest of every setting its output depends on, its own and
# those of everything upstream. Snakemake reruns a rule whose params changed, and then the jobs
# that make its inputs, even when those were deleted by a failed job while the rule's own older
# outputs stayed: without this, a training killed after a settings change left evaluations and a
# report of the old settings looking current ("Nothing to be done").
def digest(value):
    return hashlib.sha256(as_json(value).encode()).hexdigest()[:16]


def data_settings():
    return {"dataset": config["dataset"], "demo": config["demo"] if config["demo"]["enabled"] else None}


def candidate_settings(round_=1, seed=None):
    m = config["mining"]
    if round_ > 1:
        miner = mining_settings(m["model"], seed, round_miner(round_))
    elif m["candidate_files"]:
        return {"files": m["candidate_files"]}
    else:
        miner = mining_settings(m["model"], m["seed"])
    return {
        "miner": miner,
        "k_i2t": m["k_i2t"],
        "k_t2i": m["k_t2i"],
        "dtype": m["dtype"],
    }


# mining.exclude (off by default, as in the paper) enters the settings only when on, so that
# results mined before the setting existed stay current.
EXCLUDE_DUPLICATES = config["mining"]["exclude"] == "duplicate_captions"


def mining_settings(model, seed, method="baseline"):
    settings = run_settings(model, method, seed)
    return settings | {"exclude": config["mining"]["exclude"]} if EXCLUDE_DUPLICATES else settings


def run_settings(model, variant, seed):
    """Everything a trained checkpoint depends on."""
    settings = {
        "data": data_settings(),
        "arch": MODELS[model]["arch"],
        "model": model_config(model),
        "train": train_section(model, variant),
        "loss": loss_section(variant),
        "seed": int(seed),
    }
    if variant != "baseline":
        settings["candidates"] = candidate_settings(method_round(variant)[1], seed)
    if warm_start_from(variant):
        settings["warm_start"] = run_settings(model, warm_start_from(variant), seed)
    return settings


def evaluation_settings(name, method, subset):
    if method == "released":
        runs = [RELEASED[c] for c in RELEASED_ENSEMBLES[name]]
    else:
        runs = [run_settings(m, method, s) for m in ENSEMBLES[name] for s in set_seeds(name, subset)]
    return {"runs": runs, "evaluation": config["evaluation"], "data": data_settings()}


def evaluated_checkpoints(name, method, subset):
    """The checkpoints an evaluation scores together: the subset's seeds of every member, or
    the imported released checkpoints of a released ensemble."""
    if method == "released":
        return [f"{RESULTS}/released/{c}/model_best.pt" for c in RELEASED_ENSEMBLES[name]]
    return [checkpoint_path(m, method, s) for m in ENSEMBLES[name] for s in set_seeds(name, subset)]


def evaluated_runs():
    """(name, method, subset) of every evaluation the report reads."""
    return [(n, v, x) for n in ENSEMBLES for v in ensemble_variants(n) for x in evaluated_sets(n)]


def report_settings():
    return {
        "evaluations": [evaluation_settings(*run) for run in evaluated_runs()],
        "title": config["report"]["title"],
        "statistics": config["report"]["bootstrap"],
    }


def trained_runs():
    """(model, variant, seed) of every training run the configuration asks for."""
    return [(m, v, s) for m in MODELS for v in variants_of(m) for s in seeds_of(m)]


def eval_dir(name="{name}", method="{method}", subset="{subset}"):
    return f"{RESULTS}/eval/{name}/{method}/{subset}"


def evaluation_outputs():
    return [f"{eval_dir(*run)}/{e['name']}.json" for run in evaluated_runs() for e in config["evaluation"]]


def mining_outputs():
    """Every mined candidate set the configured runs train with: the miner's embeddings (none for
    the authors' files), the candidate files and the audit."""
    outputs = []
    for audit in audit_outputs():
        folder = os.path.dirname(audit)
        if audit.endswith(".json"):
            outputs += [f"{folder}/i2t_{DS_PREFIX}.npy", f"{folder}/t2i_{DS_PREFIX}.npy"]
            embeddings = folder.replace(f"{RESULTS}/candidates/", f"{RESULTS}/embeddings/", 1)
            outputs.append(os.path.join(embeddings, "train.h5"))
        outputs.append(audit)
    if config["mining"]["candidate_files"] and any(variants_of(m)[1:] for m in MODELS):
        outputs += list(miner_candidates().values())
    return outputs


def inspected_outputs():
    """What the default target asks for: every artifact a user inspects, so that a plain rerun
    rebuilds whatever is missing (say after an interrupted --forcerun) and all that follows it."""
    trained = [
        f"{train_dir(m, v, s)}/{name}"
        for m, v, s in trained_runs()
        for name in ("model_best.pt", "model_last.pt", "val_log.csv")
    ]
    evaluations = evaluation_outputs()
    ranks = [p.removesuffix(".json") + ".ranks.npz" for p in evaluations]
    return trained + mining_outputs() + evaluations + ranks + report_outputs()


def report_outputs():
    names = (
        "report.md",
        "report.csv",
        "curves.png",
        "statistics.png",
        "differences.csv",
        "results_table.html",
    )
    return [f"{RESULTS}/report/{name}" for name in names]
