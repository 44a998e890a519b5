"""What a configuration runs, in plain Python (no Snakemake): the runs (model, method, seed), their
settings and the digests of them, the paths of every artifact, the inputs and command-line flags
of each rule. The rule files (workflow/rules/*.smk) build one `Plan` from the checked config
(rules/common.smk) and read everything from it; tests build one directly (tests/test_plan.py).

Names: a *method* is what a training run was trained with, a loss variant (models/variants.py)
of a mining round (`adapoffquin_round2`, docs/mining_audit.md); an *ensemble* is evaluated
together (every model alone is an ensemble of one); a *subset* of an ensemble's seeds is one seed
(`seed<k>`) or the ensemble row (`ensemble`).
"""

import copy
import hashlib
import json
import os

import config_checks as checks


def as_json(value):
    return json.dumps(value, sort_keys=True)


# Provenance. A rule's params hold a digest of every setting its output depends on, its own and
# those of everything upstream. Snakemake reruns a rule whose params changed, and then the jobs
# that make its inputs, even when those were deleted by a failed job while the rule's own older
# outputs stayed: without this, a training killed after a settings change left evaluations and a
# report of the old settings looking current ("Nothing to be done").
def digest(value):
    return hashlib.sha256(as_json(value).encode()).hexdigest()[:16]


# The rule classes that may use GPUs (config.yaml `resources`).
GPU_CLASSES = ("train", "extract", "mine", "evaluate")
# aoq.start_from: baseline_warmup. The baseline's state when its warm-up ends is a training run of
# its own: the baseline's run cut at max_violation_warmup_epochs. Its batches, learning rates and
# losses are the baseline's (each is a function of the seed, the epoch and the iteration only), so
# its last checkpoint holds the weights the baseline has at that point
# (tests/test_train.py::test_a_run_cut_at_the_warmup_is_the_baselines_first_epochs).
WARMUP_METHOD = "baseline_warmup"
REPORT_FILES = (
    "report.md",
    "report.csv",
    "curves.png",
    "statistics.png",
    "differences.csv",
    "results_table.html",
)


def tensorboard_runs(config, loss_variants):
    """{(model, method): whether it logs to TensorBoard}. TensorBoard watches a run without changing
    it, so toggling it must rerun nothing: the key is read here and enters no --train-config and
    no digest (Plan works on a copy of the config without it)."""
    return {
        (model, variant): checks.train_section(config, model, variant).get("tensorboard", False)
        for model in config["models"]
        for variant in list(loss_variants) + checks.variants_of(config, model)
    }


def without_tensorboard(config):
    """A copy of `config` without the `tensorboard` key of any training section (the rounds',
    each model's and its rounds')."""
    config = copy.deepcopy(config)
    for owner in [config, *config["models"].values()]:
        for holder in (owner, owner.get("baseline", {}), owner.get("aoq", {})):
            holder.get("train", {}).pop("tensorboard", None)
    return config


class Plan:
    """The plan of a checked configuration (schema defaults filled in, config_checks passed)."""

    def __init__(self, config, loss_variants):
        self.tensorboard = tensorboard_runs(config, loss_variants)
        self.config = config = without_tensorboard(config)
        self.dataset = config["dataset"]["name"]
        self.data = config["dataset"]["path"]
        self.results = f"results/{self.dataset}"  # this dataset's results folder
        self.prepared = f"{self.results}/prepared"
        # Offline candidate files are named after the dataset prefix, as the authors' (i2t_coco.npy).
        self.ds_prefix = self.dataset.split("_")[0]
        # Model instances: name -> {arch, train / variants / seeds overrides, ...its config};
        # run.models selects some of them (presets define many).
        self.models = {
            name: entry
            for name, entry in config["models"].items()
            if name in config["run"].get("models", config["models"])
        }
        # What evaluation scores: every model alone (the ensemble of its seeds) and the configured
        # ensembles of several models (each with all its seeds), e.g. SCAN t-i AVG + i-t LSE; an
        # ensemble with an unselected member is left out.
        self.ensembles = {name: [name] for name in self.models} | {
            name: members for name, members in config["ensembles"].items() if set(members) <= set(self.models)
        }
        # Released checkpoints (name -> {path, arch}) and the ensembles of them to evaluate; every
        # checkpoint alone is an ensemble of one.
        self.released = config["released"]["checkpoints"]
        self.released_ensembles = {c: [c] for c in self.released} | config["released"]["ensembles"]
        self.mining_rounds = config["mining"]["rounds"]
        # mining.exclude (off by default, as in the paper) enters the settings only when on, so
        # that results mined before the setting existed stay current.
        self.exclude_duplicates = config["mining"]["exclude"] == "duplicate_captions"
        # Round-1 AOQ runs start from the baseline's warm-up (a run of its own), or from scratch.
        self.start_from_warmup = config["aoq"]["start_from"] == "baseline_warmup"
        # Training methods: the loss variants, later mining rounds' <variant>_round<r>, and the
        # baseline's warm-up where AOQ starts from it.
        methods = list(loss_variants) + [v for m in self.models for v in self.variants_of(m)]
        self.methods = list(dict.fromkeys(methods + ([WARMUP_METHOD] if self.start_from_warmup else [])))

    # --- runs ------------------------------------------------------------------------------------

    def seeds_of(self, model):
        return checks.seeds_of(self.config, model)

    def variants_of(self, model):
        return checks.variants_of(self.config, model)

    def train_section(self, model, variant):
        if variant == WARMUP_METHOD:
            section = checks.train_section(self.config, model, "baseline")
            return section | {"epochs": section["max_violation_warmup_epochs"]}
        return checks.train_section(self.config, model, variant)

    @staticmethod
    def is_baseline(method):
        """Whether `method` trains with the online triplet alone (no offline candidates)."""
        return method in ("baseline", WARMUP_METHOD)

    def trained_runs(self):
        """(model, method, seed) of every training run the configuration asks for."""
        return [(m, v, s) for m in self.models for v in self.variants_of(m) for s in self.seeds_of(m)]

    def ensemble_variants(self, name):
        """Methods every member of an ensemble was trained with, in the paper's order (then rounds)."""
        first, *others = self.ensembles[name]
        return [v for v in self.variants_of(first) if all(v in self.variants_of(m) for m in others)]

    def common_seeds(self, name):
        """Seeds every member of `name` was trained with (a model alone: its seeds)."""
        members = self.ensembles[name]
        return [s for s in self.seeds_of(members[0]) if all(s in self.seeds_of(m) for m in members)]

    def ensemble_seeds(self, name):
        """The seeds of `name`'s ensemble row (run.ensemble_seeds, where trained); none below two."""
        seeds = [s for s in self.common_seeds(name) if s in self.config["run"]["ensemble_seeds"]]
        return seeds if len(seeds) >= 2 else []

    def evaluated_sets(self, name):
        """What is evaluated of `name` per method: each seed alone (seed<k>: that seed of every
        member), and the ensemble row of its ensemble seeds when there are two or more."""
        return [f"seed{s}" for s in self.common_seeds(name)] + (
            ["ensemble"] if self.ensemble_seeds(name) else []
        )

    def set_seeds(self, name, subset):
        return self.ensemble_seeds(name) if subset == "ensemble" else [int(subset.removeprefix("seed"))]

    def evaluated_runs(self):
        """(name, method, subset) of every evaluation the report reads."""
        return [
            (n, v, x)
            for n in self.ensembles
            for v in self.ensemble_variants(n)
            for x in self.evaluated_sets(n)
        ]

    def round_miner(self, round_):
        """The method whose model mines round `round_` >= 2: the previous round's AdapOffQuin."""
        return checks.round_method(checks.ROUND_MINER, round_ - 1)

    def warm_start_from(self, method):
        """The checkpoint method a later round starts from (mining.warm_start), or None."""
        variant, round_ = checks.method_round(method)
        if round_ > 1 and self.config["mining"]["warm_start"]:
            return checks.round_method(variant, round_ - 1)
        return None

    def starts_from_warmup(self, method):
        """Whether `method` is a round-1 AOQ run that starts from the baseline's warm-up."""
        return self.start_from_warmup and not self.is_baseline(method) and checks.method_round(method)[1] == 1

    def warmup_runs(self):
        """(model, baseline_warmup, seed) of every baseline warm-up an AOQ run starts from."""
        return sorted(
            {(m, WARMUP_METHOD, s) for m, v, s in self.trained_runs() if self.starts_from_warmup(v)}
        )

    def init_checkpoint(self, model, method, seed):
        """The checkpoint whose weights a run starts from, or None (random initialisation)."""
        if self.starts_from_warmup(method):
            return f"{self.train_dir(model, WARMUP_METHOD, seed)}/model_last.pt"
        start = self.warm_start_from(method)
        return self.checkpoint_path(model, start, seed) if start else None

    # --- jobs and their resources ----------------------------------------------------------------

    def gpus_of(self, kind):
        gpus = self.config["resources"][kind]["gpus"]
        return self.config["resources"]["gpus_per_job"] if gpus is None else gpus

    def job_resources(self, kind):
        """mem_mb, runtime (minutes) and, for a GPU class, gpu of one job."""
        resources = {k: self.config["resources"][kind][k] for k in ("mem_mb", "runtime")}
        if kind in GPU_CLASSES:
            resources["gpu"] = self.gpus_of(kind)
        return resources

    # Commands are argument lists, and every field of a rule's shell command is quoted ({x:q},
    # one shell word per list element): no string from the config or a path reaches the shell as
    # code, and paths with spaces or quotes work (tests/test_shell_quoting.py).
    def step_command(self, kind, module):
        """The argv that runs `python -m <module>` for a job of class `kind`. Without GPUs it is
        just that; with GPUs it runs inside a GPU slot, and training on several GPUs runs
        torchrun, one process per GPU."""
        gpus = self.gpus_of(kind)
        if gpus == 0:
            return ["python", "-m", module]
        slot = ["python", "-m", "pipeline_steps.gpu_slot", "--gpus", str(gpus), "--"]
        if kind == "train" and gpus > 1:
            torchrun = [
                "python",
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(gpus),
            ]
            return slot + torchrun + ["-m", module]
        return slot + ["python", "-m", module]

    # --- paths -----------------------------------------------------------------------------------

    def split_inputs(self, *splits):
        """What a step reads of the data: features and cached ids of `splits`, and the manifest."""
        return {
            "ims": [f"{self.data}/{s}_ims.npy" for s in splits],
            "ids": [f"{self.prepared}/{s}_ids.npz" for s in splits],
            "manifest": f"{self.prepared}/manifest.json",
        }

    def evaluated_split_inputs(self):
        """split_inputs of every split an evaluation reads."""
        return self.split_inputs(*dict.fromkeys(e["split"] for e in self.config["evaluation"]))

    def train_dir(self, model="{model}", variant="{variant}", seed="{seed}"):
        return f"{self.results}/train/{model}/{variant}/seed{seed}"

    def checkpoint_path(self, model, variant, seed):
        return f"{self.train_dir(model, variant, seed)}/model_best.pt"

    def eval_dir(self, name="{name}", method="{method}", subset="{subset}"):
        return f"{self.results}/eval/{name}/{method}/{subset}"

    def evaluation_files(self, folder, suffix=".json"):
        """One file per configured evaluation in `folder` (the metrics; suffix .ranks.npz: ranks)."""
        return [f"{folder}/{e['name']}{suffix}" for e in self.config["evaluation"]]

    def candidate_folder(self, round_=1, seed=None):
        """Where a mining round's i2t / t2i files lie: round 1 by the configured baseline (one seed
        for every run) or the authors' files (mining.candidate_files) once checked; round r >= 2
        by the same seed's round_miner(r)."""
        m = self.config["mining"]
        if round_ > 1:
            return f"{self.results}/candidates/{m['model']}/{self.round_miner(round_)}/seed{seed}"
        if m["candidate_files"]:
            return f"{self.results}/candidates/authors"
        return f"{self.results}/candidates/{m['model']}/seed{m['seed']}"

    def miner_candidates(self, round_=1, seed=None):
        folder = self.candidate_folder(round_, seed)
        return {"i2t": f"{folder}/i2t_{self.ds_prefix}.npy", "t2i": f"{folder}/t2i_{self.ds_prefix}.npy"}

    def audit_outputs(self):
        """The mining audit of every candidate set the configured runs train with."""
        seeds = sorted({s for name in self.models if self.variants_of(name)[1:] for s in self.seeds_of(name)})
        # Nothing is mined when no run trains with offline candidates (a baseline-only config).
        folders = [] if self.config["mining"]["candidate_files"] or not seeds else [self.candidate_folder()]
        folders += [self.candidate_folder(r, s) for r in range(2, self.mining_rounds + 1) for s in seeds]
        return [f"{folder}/audit.{ext}" for folder in folders for ext in ("json", "png")]

    def mining_outputs(self):
        """Every mined candidate set the configured runs train with: the miner's embeddings (none
        for the authors' files), the candidate files and the audit."""
        outputs = []
        for audit in self.audit_outputs():
            folder = os.path.dirname(audit)
            if audit.endswith(".json"):
                outputs += [f"{folder}/i2t_{self.ds_prefix}.npy", f"{folder}/t2i_{self.ds_prefix}.npy"]
                embeddings = folder.replace(f"{self.results}/candidates/", f"{self.results}/embeddings/", 1)
                outputs.append(os.path.join(embeddings, "train.h5"))
            outputs.append(audit)
        if self.config["mining"]["candidate_files"] and any(self.variants_of(m)[1:] for m in self.models):
            outputs += list(self.miner_candidates().values())
        return outputs

    def evaluation_outputs(self):
        return [path for run in self.evaluated_runs() for path in self.evaluation_files(self.eval_dir(*run))]

    def rank_outputs(self):
        return [p.removesuffix(".json") + ".ranks.npz" for p in self.evaluation_outputs()]

    def val_logs(self):
        return [f"{self.train_dir(m, v, s)}/val_log.csv" for m, v, s in self.trained_runs()]

    def report_outputs(self):
        return [f"{self.results}/report/{name}" for name in REPORT_FILES]

    def inspected_outputs(self):
        """What the default target asks for: every artifact a user inspects, so that a plain rerun
        rebuilds whatever is missing (say after an interrupted --forcerun) and all that follows."""
        trained = [
            f"{self.train_dir(m, v, s)}/{name}"
            for m, v, s in self.trained_runs() + self.warmup_runs()
            for name in ("model_best.pt", "model_last.pt", "val_log.csv")
        ]
        return (
            trained
            + self.mining_outputs()
            + self.evaluation_outputs()
            + self.rank_outputs()
            + self.report_outputs()
        )

    def evaluated_checkpoints(self, name, method, subset):
        """The checkpoints an evaluation scores together: the subset's seeds of every member, or
        the imported released checkpoints of a released ensemble."""
        if method == "released":
            return [f"{self.results}/released/{c}/model_best.pt" for c in self.released_ensembles[name]]
        return [
            self.checkpoint_path(m, method, s)
            for m in self.ensembles[name]
            for s in self.set_seeds(name, subset)
        ]

    # --- settings: what each output depends on ---------------------------------------------------

    def model_config(self, model):
        return {k: v for k, v in self.models[model].items() if k not in checks.PIPELINE_KEYS}

    def loss_section(self, method):
        # The baseline gets only its own margin, so AOQ hyperparameters never rerun it.
        variant, _ = checks.method_round(method)
        if self.is_baseline(variant):
            return {"variant": "baseline", "margin_online": self.config["baseline"]["margin"]}
        return {"variant": variant, **self.config["aoq"]["loss"]}

    def data_settings(self):
        config = self.config
        return {"dataset": config["dataset"], "demo": config["demo"] if config["demo"]["enabled"] else None}

    def candidate_settings(self, round_=1, seed=None):
        m = self.config["mining"]
        if round_ > 1:
            miner = self.mining_settings(m["model"], seed, self.round_miner(round_))
        elif m["candidate_files"]:
            return {"files": m["candidate_files"]}
        else:
            miner = self.mining_settings(m["model"], m["seed"])
        return {"miner": miner, "k_i2t": m["k_i2t"], "k_t2i": m["k_t2i"], "dtype": m["dtype"]}

    def mining_settings(self, model, seed, method="baseline"):
        settings = self.run_settings(model, method, seed)
        return (
            settings | {"exclude": self.config["mining"]["exclude"]} if self.exclude_duplicates else settings
        )

    def run_settings(self, model, variant, seed):
        """Everything a trained checkpoint depends on."""
        settings = {
            "data": self.data_settings(),
            "arch": self.models[model]["arch"],
            "model": self.model_config(model),
            "train": self.train_section(model, variant),
            "loss": self.loss_section(variant),
            "seed": int(seed),
        }
        if not self.is_baseline(variant):
            settings["candidates"] = self.candidate_settings(checks.method_round(variant)[1], seed)
        if self.warm_start_from(variant):
            settings["warm_start"] = self.run_settings(model, self.warm_start_from(variant), seed)
        if self.starts_from_warmup(variant):  # only then: results of runs from scratch stay current
            settings["start"] = self.run_settings(model, WARMUP_METHOD, seed)
        return settings

    def evaluation_settings(self, name, method, subset):
        if method == "released":
            runs = [self.released[c] for c in self.released_ensembles[name]]
        else:
            runs = [
                self.run_settings(m, method, s)
                for m in self.ensembles[name]
                for s in self.set_seeds(name, subset)
            ]
        return {"runs": runs, "evaluation": self.config["evaluation"], "data": self.data_settings()}

    def report_settings(self):
        return {
            "evaluations": [self.evaluation_settings(*run) for run in self.evaluated_runs()],
            "title": self.config["report"]["title"],
            "statistics": self.config["report"]["bootstrap"],
        }

    def largest_offline_size(self):
        """The largest offline_size any AOQ run draws with (1 when none does)."""
        sizes = [
            self.train_section(m, v)["offline_size"]
            for m in self.models
            for v in self.variants_of(m)
            if v != "baseline"
        ]
        return max(sizes, default=1)

    # --- what rules call with a job's wildcards (and input / output) ---------------------------

    def train_inputs(self, wildcards):
        inputs = self.split_inputs("train", "dev")
        if not self.is_baseline(wildcards.variant):
            inputs.update(self.miner_candidates(checks.method_round(wildcards.variant)[1], wildcards.seed))
        init = self.init_checkpoint(wildcards.model, wildcards.variant, wildcards.seed)
        if init:
            inputs["init"] = init
        return inputs

    @staticmethod
    def candidate_flags(wildcards, input):
        """Offline candidates of an AOQ run, and the checkpoint a run starts from (a later mining
        round's previous round, or the baseline's warm-up)."""
        candidates = (
            ["--candidates-i2t", input.i2t, "--candidates-t2i", input.t2i] if "i2t" in input.keys() else []
        )
        init = ["--init-from", input.init] if "init" in input.keys() else []
        return candidates + init

    def tensorboard_flags(self, wildcards):
        folder = f"logs/{self.dataset}/tensorboard/{wildcards.model}/{wildcards.variant}/seed{wildcards.seed}"
        return (
            ["--tensorboard-dir", folder]
            if self.tensorboard.get((wildcards.model, wildcards.variant))
            else []
        )

    def evaluation_flags(self, outputs):
        """--evaluation NAME SPLIT PROTOCOL OUT for every configured evaluation."""
        return [
            word
            for e, out in zip(self.config["evaluation"], outputs)
            for word in ("--evaluation", e["name"], e["split"], e["protocol"], out)
        ]

    def download_source_flags(self, wildcards):
        """Where the data comes from: an existing folder, an archive on disk, or the mirrors."""
        d = self.config["download"]
        if d["adopt_folder"]:
            return ["--adopt-folder", d["adopt_folder"], "--extract", d["extract"]]
        if d["adopt_archive"]:
            return ["--adopt-archive", d["adopt_archive"], "--extract", d["extract"]]
        return ["--urls", *d["urls"], "--archive", d["archive"], "--extract", d["extract"]]

    def vocab_flags(self, wildcards):
        """A released vocabulary instead of building one: SCAN json or the VSRN/AOQ Python-2 pickle."""
        if self.config["dataset"]["vocab_json"]:
            return ["--vocab-json", self.config["dataset"]["vocab_json"]]
        if self.config["dataset"]["vocab_pkl"]:
            return ["--vocab-pkl", self.config["dataset"]["vocab_pkl"]]
        return []

    @staticmethod
    def miner_method(wildcards):
        """The method of the model that mines (or whose embeddings are) {miner}: baseline in round 1."""
        return wildcards.miner.rstrip(os.sep) or "baseline"

    @staticmethod
    def data_dir(wildcards, input):
        return os.path.dirname(input.ims[0])

    @staticmethod
    def prepared_dir(wildcards, input):
        return os.path.dirname(input.manifest)

    def wildcard_patterns(self):
        """The regular expressions of the rules' wildcards."""
        return {
            "model": "|".join(self.models),
            "subset": r"seed\d+|ensemble",
            "ckpt": "|".join(self.released) or "^$",
            "variant": "|".join(self.methods),
            "seed": r"\d+",
            # The model that mines a candidate set, as a folder: empty for the round-1 baseline
            # (candidates/<model>/seed<k>/), "<method>/" for a later round's miner
            # (candidates/<model>/<method>/seed<k>/).
            "miner": "|".join([""] + [f"{v}/" for m in self.models for v in self.variants_of(m)[1:]]),
        }
