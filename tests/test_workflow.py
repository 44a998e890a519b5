"""The Snakemake workflow end to end on a tiny config: full run, no-op rerun, selective reruns, lint."""

import copy
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import (
    ENV,
    REPO,
    SNAKEFILE,
    SNAKEMAKE,
    planned_jobs,
    snakemake,
    succeeded,
    tiny_config,
    write_config,
)

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workflow")
    config = tiny_config()
    succeeded(workdir, config)
    return workdir, config


def test_full_run_writes_every_stage(finished_run):
    workdir, config = finished_run
    results = workdir / "results" / "demo_precomp"
    report = (results / "report" / "report.md").read_text()
    for label in ("baseline", "+OffTri", "+OffQuin", "+AdapOffQuin"):
        assert f"| vsepp | {label} |" in report
    assert (results / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (results / "embeddings" / "vsepp" / "seed0" / "train.h5").exists()
    i2t = __import__("numpy").load(results / "candidates" / "vsepp" / "seed0" / "i2t_demo.npy")
    assert i2t.shape == (40, 30) and i2t.dtype == "int32"
    coco1k = json.loads((results / "eval" / "vsepp" / "adapoffquin" / "seed0" / "coco_1k.json").read_text())
    assert coco1k["protocol"] == "5fold" and len(coco1k["folds"]) == 5
    for rule in ("make_demo_data", "prepare_data", "train", "evaluate", "report"):
        assert any((workdir / "logs").rglob("*.log")), rule
    assert not list(results.rglob(".*.tmp-*")), "temporary files left behind"


def test_second_run_does_nothing(finished_run):
    workdir, config = finished_run
    result = snakemake(workdir, config, "-n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_aoq_hyperparameter_reruns_only_aoq_and_downstream(finished_run):
    workdir, config = finished_run
    changed = copy.deepcopy(config)
    changed["aoq"]["loss"]["alpha"] = 0.5
    jobs = planned_jobs(snakemake(workdir, changed, "-n"))
    rules = {rule for rule, _ in jobs}
    assert rules == {"train", "evaluate", "report", "all"}, jobs
    trained = {w for rule, w in jobs if rule == "train"}
    assert all("baseline" not in w for w in trained) and len(trained) == 3, trained


def test_baseline_change_reruns_mining_too(finished_run):
    workdir, config = finished_run
    changed = copy.deepcopy(config)
    changed["baseline"]["train"]["learning_rate"] = 0.001
    rules = {rule for rule, _ in planned_jobs(snakemake(workdir, changed, "-n"))}
    assert {"extract_embeddings", "mine_candidates", "train"} <= rules
    assert "prepare_data" not in rules and "make_demo_data" not in rules


def test_lint_is_clean():
    result = subprocess.run(
        SNAKEMAKE + ["-s", str(SNAKEFILE), "--lint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert "good condition" in result.stdout + result.stderr, result.stdout[-3000:]


def test_bad_config_is_rejected_by_the_schema(tmp_path):
    config = tiny_config()
    config["aoq"]["variants"] = ["offtri", "not_a_variant"]
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "not_a_variant" in result.stderr + result.stdout


def test_readme_dag_picture_matches_the_rulegraph():
    result = subprocess.run(
        SNAKEMAKE + ["-s", str(SNAKEFILE), "--rulegraph"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    labels = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', result.stdout, re.M))
    graph = {(labels[a], labels[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", result.stdout, re.M)}
    readme = (REPO / "README.md").read_text().split("```mermaid", 1)[1].split("```", 1)[0]
    drawn = set(re.findall(r"(\w+) -->(?:\|[^|]*\|)? (\w+)", readme))
    assert graph and drawn == graph


def test_download_rule_is_planned_for_real_data(tmp_path):
    config = tiny_config()
    config["demo"]["enabled"] = False
    config["dataset"].update(
        name="f30k_precomp", path="resources/data/f30k_precomp", splits=["train", "dev", "test"]
    )
    config["download"] = {
        "enabled": True,
        "urls": ["http://127.0.0.1:9/data.zip"],
        "archive": "resources/scan_data.zip",
        "extract": "data/f30k_precomp",
    }
    config["evaluation"] = [{"name": "f30k_1k", "split": "test", "protocol": "full"}]
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rules = {rule for rule, _ in planned_jobs(result)}
    assert "download_data" in rules and "make_demo_data" not in rules


def test_released_checkpoints_evaluate_as_an_ensemble(finished_run):
    import torch

    from models import create_model
    from tests.test_import_checkpoint import write_reference

    workdir, config = finished_run
    prepared = workdir / "results" / "demo_precomp" / "prepared"
    vocab = json.loads((prepared / "manifest.json").read_text())["vocab_size"]
    released = copy.deepcopy(config)
    released["released"] = {"checkpoints": {}, "ensembles": {"aoq_vsrn": ["run1", "run2"]}}
    for seed, name in enumerate(("run1", "run2")):
        torch.manual_seed(seed)
        model = create_model(
            "vsrn",
            vocab_size=vocab,
            img_dim=16,
            embed_size=12,
            word_dim=8,
            dim_hidden=8,
            dim_word=6,
            max_len=14,
        )
        write_reference(workdir / f"{name}.pth.tar", model, "coco_precomp")
        released["released"]["checkpoints"][name] = {"path": str(workdir / f"{name}.pth.tar"), "arch": "vsrn"}
    result = snakemake(workdir, released, "released")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    metrics = json.loads(
        (
            workdir
            / "results"
            / "demo_precomp"
            / "eval"
            / "aoq_vsrn"
            / "released"
            / "ensemble"
            / "coco_5k.json"
        ).read_text()
    )
    assert len(metrics["models"]) == 2 and metrics["label"] == "released:aoq_vsrn"
    assert {m["variant"] for m in metrics["models"]} == {"released"}


def test_authors_candidate_files_replace_mining(tmp_path):
    import numpy as np

    config = tiny_config()
    files = {k: tmp_path / f"{k}_demo.npy" for k in ("i2t", "t2i")}
    for path in files.values():
        np.save(path, np.zeros((1, 1), dtype=np.int32))
    config["mining"]["candidate_files"] = {k: str(v) for k, v in files.items()}
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rules = {rule for rule, _ in planned_jobs(result)}
    assert "adopt_candidates" in rules and not rules & {"extract_embeddings", "mine_candidates"}


def test_whole_dag_on_a_scan_layout_folder_with_a_vocab_json(tmp_path):
    """Real-data mode: no demo rule; an existing SCAN-layout folder and a SCAN vocab json."""
    from pipeline_steps import make_demo_data
    from pipeline_steps.data.text import build_vocab, make_tokenizer, read_caption_lines, vocab_json_text

    folder = tmp_path / "data" / "scanlike_precomp"
    make_demo_data.main(
        [
            "--out",
            str(folder),
            "--seed",
            "5",
            "--n-train",
            "40",
            "--n-dev",
            "10",
            "--n-test",
            "10",
            "--n-testall-per-fold",
            "4",
            "--img-dim",
            "16",
            "--dev-rows-per-caption",
        ]
    )
    (folder / "demo_meta.json").unlink()
    for split in ("train", "dev", "test"):  # SCAN's release also ships ids files
        (folder / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in range(100)))
    tokenize, _ = make_tokenizer()
    words = build_vocab([tokenize(line) for line in read_caption_lines(folder / "train_caps.txt")], 1)
    vocab = tmp_path / "scanlike_precomp_vocab.json"
    vocab.write_text(vocab_json_text(words))
    config = tiny_config()
    config["demo"]["enabled"] = False
    config["dataset"].update(
        name="scanlike_precomp", path=str(folder), splits=["train", "dev", "test"], vocab_json=str(vocab)
    )
    config["aoq"]["variants"] = ["adapoffquin"]
    config["evaluation"] = [{"name": "f30k_1k", "split": "test", "protocol": "full"}]
    result = snakemake(tmp_path, config)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = tmp_path / "results" / "scanlike_precomp"
    manifest = json.loads((results / "prepared" / "manifest.json").read_text())
    assert manifest["vocab_size"] == len(words) and manifest["vocab"].startswith("loaded")
    assert manifest["splits"]["dev"]["rows_per_image"] == 5
    assert (results / "candidates" / "vsepp" / "seed0" / "t2i_scanlike.npy").exists()
    assert "| vsepp | +AdapOffQuin |" in (results / "report" / "report.md").read_text()


def planned_commands(result):
    """rule -> [(resources line, shell command)] of every job a dry run with -p plans."""
    jobs = {}
    for block in re.split(r"^(?:local)?rule ", result.stdout, flags=re.M)[1:]:
        resources = re.search(r"^\s+resources: (.*)$", block, re.M)
        command = re.search(r"^Shell command: (.*)$", block, re.M)
        if command and command.group(1) != "None":
            jobs.setdefault(block.split(":", 1)[0], []).append((resources.group(1), command.group(1)))
    return jobs


def test_gpu_settings_reach_the_jobs(tmp_path):
    cpu = planned_commands(snakemake(tmp_path, tiny_config(), "-n", "-p"))
    assert cpu["train"][0][1].startswith("python -m pipeline_steps.train --data ")
    assert all(
        "gpu=0" in res and "gpu_slot" not in cmd for rule in ("train", "evaluate") for res, cmd in cpu[rule]
    )
    config = tiny_config()
    config["resources"]["gpus_per_job"] = 1
    config["resources"]["train"]["gpus"] = 2
    gpu = planned_commands(snakemake(tmp_path, config, "-n", "-p"))
    slot = "python -m pipeline_steps.gpu_slot --gpus {} -- python -m "
    for res, cmd in gpu["train"]:
        assert "gpu=2" in res and "mem_mb=500" in res and "runtime=7" in res
        assert cmd.startswith(
            slot.format(2) + "torch.distributed.run --standalone --nproc_per_node 2 "
            "-m pipeline_steps.train --data "
        )
    for rule, step in (
        ("extract_embeddings", "extract_embeddings"),
        ("mine_candidates", "mine_candidates"),
        ("evaluate", "evaluate"),
    ):
        assert all(
            "gpu=1" in res and cmd.startswith(slot.format(1) + f"pipeline_steps.{step} ")
            for res, cmd in gpu[rule]
        ), gpu[rule]
    assert gpu["prepare_data"] == cpu["prepare_data"]  # CPU-only rules are untouched


def trainer_processes(workdir):
    """{pid: --resume-dir} of the running `python -m pipeline_steps.train` processes of a
    Snakemake run in `workdir` (their working directory): never another run's trainers."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if entry.name.isdigit() and b"pipeline_steps.train" in args and b"--resume-dir" in args:
            if Path(cwd) == Path(workdir):
                found[int(entry.name)] = args[args.index(b"--resume-dir") + 1].decode()
    return found


def test_a_killed_retrain_is_resumed_and_no_result_describes_old_settings(tmp_path):
    """The audit's repro: finish the DAG, change an AOQ setting, kill -9 one retraining trainer.
    Snakemake deletes that job's outputs but not the older evaluations and report downstream, so
    it used to plan nothing. A plain rerun must resume the killed training, and every metrics
    file and the report must then describe the new setting."""
    config = tiny_config()
    config["aoq"]["train"].update(epochs=30, val_step=1)  # long enough to be caught mid-run
    # One retraining: once it is killed, nothing else is left to make the evaluation look stale.
    config["aoq"]["variants"] = ["adapoffquin"]
    assert snakemake(tmp_path, config).returncode == 0
    changed = copy.deepcopy(config)
    changed["aoq"]["loss"]["alpha"] = 0.5
    cmd = SNAKEMAKE + [
        "-s",
        str(SNAKEFILE),
        "--directory",
        str(tmp_path),
        "--configfile",
        str(write_config(tmp_path, changed)),
        "--cores",
        "2",
    ]
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    killed, deadline = None, time.time() + 300
    while killed is None and time.time() < deadline and run.poll() is None:
        for pid, resume in trainer_processes(tmp_path).items():
            if (tmp_path / resume / "state.pt").exists():
                os.kill(pid, signal.SIGKILL)
                killed = resume
                break
        time.sleep(0.02)
    assert killed, "no trainer was caught running"
    assert run.wait(timeout=600) != 0
    planned = planned_jobs(snakemake(tmp_path, changed, "-n"))
    assert {rule for rule, _ in planned} >= {"train", "evaluate", "report"}, planned
    result = snakemake(tmp_path, changed)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    variant = Path(killed).parent.name
    log = (tmp_path / "logs" / "demo_precomp" / "train" / f"vsepp_{variant}_seed0.log").read_text()
    assert "resuming at epoch" in log
    results = tmp_path / "results" / "demo_precomp"
    report = pd.read_csv(results / "report" / "report.csv")
    for variant in config["aoq"]["variants"]:
        for evaluation in config["evaluation"]:
            metrics = json.loads(
                (results / "eval" / "vsepp" / variant / "seed0" / f"{evaluation['name']}.json").read_text()
            )
            assert [m["loss_config"]["alpha"] for m in metrics["models"]] == [0.5]
            row = report[(report.evaluation == evaluation["name"]) & (report.variant == variant)]
            assert row.rsum.item() == pytest.approx(metrics["rsum"], abs=1e-4)
    assert not (tmp_path / "results" / ".resume").exists() or not any(
        (tmp_path / "results" / ".resume").iterdir()
    )


def inspected(results):
    """The artifacts of a finished tiny run that a user inspects (besides the report), and the
    rule that makes each."""
    aoq = results / "train" / "vsepp" / "adapoffquin" / "seed0"
    mined = results / "candidates" / "vsepp" / "seed0"
    return {
        aoq / "model_best.pt": "train",
        aoq / "model_last.pt": "train",
        aoq / "val_log.csv": "train",
        results / "embeddings" / "vsepp" / "seed0" / "train.h5": "extract_embeddings",
        mined / "i2t_demo.npy": "mine_candidates",
        mined / "audit.png": "audit_mining",
        results / "eval" / "vsepp" / "adapoffquin" / "seed0" / "coco_5k.ranks.npz": "evaluate",
    }


def test_an_interrupted_forcerun_is_completed_by_a_plain_rerun(tmp_path):
    """The audit's repro: `--forcerun mine_candidates` killed (kill -9 of Snakemake and its jobs)
    once the AOQ retraining has started. A plain rerun used to say "Nothing to be done" while
    artifacts were missing; the default target now names every artifact a user inspects, so the
    rerun rebuilds what is missing and everything after it. Then each artifact, deleted alone,
    makes a plain (dry) rerun plan the rule that makes it."""
    config = tiny_config()
    config["aoq"]["train"].update(epochs=30, val_step=1)  # long enough to be caught mid-run
    config["aoq"]["variants"] = ["adapoffquin"]
    succeeded(tmp_path, config)
    results = tmp_path / "results" / "demo_precomp"
    cmd = SNAKEMAKE + ["-s", str(SNAKEFILE), "--directory", str(tmp_path)]
    cmd += [
        "--configfile",
        str(write_config(tmp_path, config)),
        "--cores",
        "2",
        "--forcerun",
        "mine_candidates",
    ]
    run = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True
    )
    deadline = time.time() + 300
    while not trainer_processes(tmp_path) and time.time() < deadline and run.poll() is None:
        time.sleep(0.02)
    assert trainer_processes(tmp_path), "no AOQ trainer was caught running"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    for pid in trainer_processes(tmp_path):  # a trainer outside the group (none expected) would linger
        os.kill(pid, signal.SIGKILL)
    succeeded(tmp_path, config, "--unlock")
    missing = [p for p in inspected(results) if not p.exists()]
    assert missing, "the kill left every artifact in place: nothing was tested"
    planned = {rule for rule, _ in planned_jobs(snakemake(tmp_path, config, "-n"))}
    assert {"train", "evaluate", "report"} <= planned, planned
    succeeded(tmp_path, config)
    assert all(p.exists() for p in inspected(results))
    assert "Nothing to be done" in succeeded(tmp_path, config, "-n").stdout
    for path, rule in inspected(results).items():
        aside = path.rename(path.with_name(path.name + ".aside"))
        planned = {rule for rule, _ in planned_jobs(snakemake(tmp_path, config, "-n"))}
        aside.rename(path)
        assert {rule, "report"} <= planned, (path.name, planned)


def test_a_baseline_only_config_runs_to_its_report(tmp_path):
    """aoq.variants: [] is a legitimate config: baselines, their evaluations and the report,
    nothing mined."""
    config = tiny_config()
    config["aoq"]["variants"] = []
    succeeded(tmp_path, config)
    results = tmp_path / "results" / "demo_precomp"
    report = pd.read_csv(results / "report" / "report.csv")
    assert set(report["variant"]) == {"baseline"}
    assert not (results / "candidates").exists() and not (results / "embeddings").exists()
