"""Small builders shared by several test files."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline_steps import make_demo_data, prepare_data

REPO = Path(__file__).resolve().parents[1]
# The workflow's plain-Python modules (config_checks, plan) are imported as Snakemake imports them.
if str(REPO / "workflow") not in sys.path:
    sys.path.insert(0, str(REPO / "workflow"))
SNAKEFILE = REPO / "workflow" / "Snakefile"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# Rules call `python`: the interpreter running the tests must be the one they find.
ENV = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}


def tiny_config():
    """config.yaml shrunk to a DAG that runs in a minute or two on CPU."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["dataset"].update(img_dim=16)
    config["demo"].update(n_train=40, n_dev=10, n_test=10, n_testall_per_fold=4)
    config["models"] = {"vsepp": {"arch": "vsepp", "embed_size": 16, "word_dim": 8}}
    config["mining"]["model"] = "vsepp"
    config["run"]["seeds"] = [0]
    config["aoq"]["variants"] = ["offtri", "offquin", "adapoffquin"]
    for section in (config["baseline"]["train"], config["aoq"]["train"]):
        section.update(epochs=1, batch_size=50, val_step=100, eval_batch_size=64)
    config["aoq"]["train"]["offline_size"] = 20
    config["mining"].update(k_i2t=30, k_t2i=10)
    # Tiny jobs, and a different size per rule class so a scheduler's view can be checked.
    for i, kind in enumerate(("light", "data", "train", "extract", "mine", "evaluate")):
        config["resources"][kind].update(mem_mb=300 + 100 * i, runtime=5 + i)
    return config


def planned(config, workdir="."):
    """The workflow's Plan of `config` (workflow/plan.py), checked as Snakemake checks it when it
    starts (schema defaults filled in, config_checks): what the rules read, without Snakemake.
    Raises config_checks.ConfigError for a refused config."""
    import config_checks
    from plan import Plan

    from models.variants import VARIANTS

    config = copy.deepcopy(config)
    config_checks.validated(
        config, REPO / "workflow" / "schemas" / "config.schema.yaml", list(VARIANTS), workdir
    )
    return Plan(config, list(VARIANTS))


def refusal(config, workdir="."):
    """The one-line refusal of `config` as Snakemake would print it, or None when accepted."""
    import config_checks

    try:
        planned(config, workdir)
    except config_checks.ConfigError as err:
        return str(err)
    return None


def write_config(workdir, config):
    path = workdir / f"config-{abs(hash(json.dumps(config, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def copy_of_the_repository(dest):
    """The repository's tracked and untracked (not ignored) files copied to `dest`: a clone to change
    (tests that add a variant or an architecture to it)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes((REPO / name).read_bytes())


def snakemake(workdir, config, *args, repo=REPO):
    """Snakemake with `config` in `workdir`; `repo`: the repository whose workflow runs (a copy)."""
    env = ENV if repo == REPO else ENV | {"PYTHONPATH": str(repo)}
    cmd = SNAKEMAKE + [
        "-s",
        str(repo / "workflow" / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(write_config(workdir, config)),
        "--cores",
        "2",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def succeeded(workdir, config, *args):
    """snakemake(...) that fails the calling test with the tail of Snakemake's output unless it
    succeeds."""
    result = snakemake(workdir, config, *args)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def planned_jobs(result):
    """(rule, wildcards) of every job a dry run plans."""
    jobs, rule = [], None
    for line in result.stdout.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if match:
            rule = match.group(1)
            jobs.append((rule, ""))
        elif line.strip().startswith("wildcards:") and jobs:
            jobs[-1] = (rule, line.strip()[len("wildcards:") :].strip())
    return jobs


def make_prepared_demo(root, seed, n_train, n_dev, n_test, splits, img_dim=16):
    """A tiny generated dataset and its prepared folder under `root`: (data, prepared)."""
    data, prepared = root / "demo_precomp", root / "prepared"
    make_demo_data.main(
        [
            "--out",
            str(data),
            "--seed",
            str(seed),
            "--n-train",
            str(n_train),
            "--n-dev",
            str(n_dev),
            "--n-test",
            str(n_test),
            "--n-testall-per-fold",
            "4",
            "--img-dim",
            str(img_dim),
        ]
    )
    prepare_data.main(
        ["--data", str(data), "--out", str(prepared), "--img-dim", str(img_dim), "--splits", *splits]
    )
    return data, prepared


def random_caption_batch(vocab_size, seed=1, batch=6, max_len=9, extra_pad=2):
    """Random ids with random lengths (1 included), zero-padded, `extra_pad` columns wider than
    the longest caption."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = 1
    ids = torch.randint(1, vocab_size, (batch, int(lengths.max()) + extra_pad), generator=g)
    ids[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    return ids, lengths


def random_images(img_dim, seed=2, batch=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 36, img_dim, generator=g)


def train_argv(
    train_data,
    out,
    model="vsepp",
    model_config='{"embed_size": 16, "word_dim": 8}',
    train_config="{}",
    variant="baseline",
    seed=0,
    **extra,
):
    """argv of `pipeline_steps.train` on the `train_data` fixture (conftest.py), outputs in `out`;
    `extra` adds options (threads=1 -> --threads 1). AOQ variants get the fixture's candidates."""
    options = {
        "data": train_data["data"],
        "prepared": train_data["prepared"],
        "model": model,
        "model_config": model_config,
        "train_config": train_config,
        "loss_config": f'{{"variant": "{variant}"}}',
        "seed": seed,
        "device": "cpu",
        "out_best": out / "best.pt",
        "out_last": out / "last.pt",
        "out_log": out / "val.csv",
        "resume_dir": out / "resume",
    }
    if variant != "baseline":
        options.update(candidates_i2t=train_data["i2t"], candidates_t2i=train_data["t2i"])
    return [
        arg for key, value in (options | extra).items() for arg in (f"--{key.replace('_', '-')}", str(value))
    ]
