"""Training survives what happens to long jobs: a NaN, a second trainer on the same resume
folder, a half-written or half-deleted resume state, stale temporary files, reruns."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pipeline_steps import train
from pipeline_steps.data.batches import epoch_batches
from tests.helpers import REPO, train_argv
from tests.test_train import TRAIN, run_train, same_weights

# TRAIN: 150 captions in batches of 32 = 5 iterations an epoch, a validation at iteration 4.
POISONED_CAPTION = int(epoch_batches(150, 32, 0, 0)[4][0])  # in the 5th batch of epoch 0


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison(monkeypatch, where):
    """From the batch holding POISONED_CAPTION on, the loss (or only its gradient) is NaN."""
    original = train.training_loss

    def poisoned(model, batch, *args, **kwargs):
        loss, terms = original(model, batch, *args, **kwargs)
        if POISONED_CAPTION in batch["index"].tolist():
            loss = loss * float("nan") if where == "loss" else _NanGradient.apply(loss)
        return loss, terms

    monkeypatch.setattr(train, "training_loss", poisoned)


@pytest.mark.parametrize("where,what", [("loss", "loss"), ("gradient", "gradient norm")])
def test_non_finite_stops_at_once_naming_the_step_and_keeps_the_last_state(
    train_data, tmp_path, monkeypatch, where, what
):
    poison(monkeypatch, where)
    for _ in range(2):  # the rerun replays from the kept state and stops the same way
        with pytest.raises(SystemExit) as stop:
            run_train(train_data, tmp_path)
        message = str(stop.value)
        assert "\n" not in message
        assert message.startswith(
            f"error: non-finite {what} (nan) at model=vsepp variant=baseline seed=0 epoch=0 iteration=5;"
        ), message
        assert "resume state of iteration 4 is kept" in message
        state = torch.load(tmp_path / "resume" / "state.pt", weights_only=True)
        assert state["iteration"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
        assert not any((tmp_path / name).exists() for name in ("best.pt", "last.pt", "val.csv"))


def hold_lock(folder):
    """A process that takes the folder's lock and sleeps (a trainer that still runs)."""
    code = (
        "import sys, time; from pipeline_steps.training.resume import ResumeFolder; "
        "ResumeFolder(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_trainer_is_refused_naming_the_first(train_data, tmp_path):
    holder = hold_lock(tmp_path / "resume")
    try:
        with pytest.raises(SystemExit) as stop:
            run_train(train_data, tmp_path)
        message = str(stop.value)
        assert message.startswith(
            f"error: {tmp_path / 'resume'} is in use by another trainer (pid {holder.pid} "
        )
        assert "\n" not in message and not (tmp_path / "best.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    run_train(train_data, tmp_path)  # the lock died with its process
    assert (tmp_path / "best.pt").exists() and not (tmp_path / "resume").exists()


def test_an_orphan_trainer_then_a_rerun(train_data, tmp_path):
    """The audit's repro: a trainer runs on (an orphan of a killed Snakemake) while a rerun
    starts. The rerun is refused; once the orphan is killed, a rerun resumes from its state and
    ends as an uninterrupted run."""
    long_train = TRAIN.replace('"epochs": 2', '"epochs": 40')
    # Both runs on one thread: bitwise-equal weights need the same thread count (torch's default
    # follows OMP_NUM_THREADS and the machine's cores).
    run_train(train_data, tmp_path / "full", extra=["--train-config", long_train, "--threads", "1"])
    out = tmp_path / "killed"
    argv = train_argv(train_data, out, train_config=long_train, threads=1)
    orphan = subprocess.Popen(
        [sys.executable, "-m", "pipeline_steps.train", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "resume" / "state.pt").exists():
            assert orphan.poll() is None and time.time() < deadline, "the trainer ended too soon"
            time.sleep(0.05)
        with pytest.raises(SystemExit, match=f"in use by another trainer \\(pid {orphan.pid} "):
            train.main(argv)
    finally:
        orphan.send_signal(signal.SIGKILL)
        orphan.wait()
    assert not (out / "last.pt").exists(), "the orphan finished before it was killed"
    train.main(argv)
    for name in ("best.pt", "last.pt"):
        assert same_weights(tmp_path / "full" / name, out / name)
    assert (tmp_path / "full" / "val.csv").read_text() == (out / "val.csv").read_text()


def interrupted_run(train_data, out, monkeypatch, saves=2, variant="baseline"):
    """A run killed right after its `saves`-th resume state."""
    original, calls = train.Run.save_state, []

    def save_then_die(self):
        original(self)
        calls.append(1)
        if len(calls) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(train_data, out, variant)
    monkeypatch.setattr(train.Run, "save_state", original)
    return out / "resume"


@pytest.mark.parametrize(
    "damage",
    [
        "best file missing",
        "best file of another iteration",
        "state truncated",
        "state without best file",
        "only best files",
    ],
)
def test_an_incomplete_state_is_discarded_and_training_restarts(
    train_data, tmp_path, monkeypatch, caplog, damage
):
    run_train(train_data, tmp_path / "fresh")
    resume = interrupted_run(train_data, tmp_path / "run", monkeypatch)
    best = next(resume.glob("best-*.pt"))
    if damage == "best file missing":
        best.unlink()
    elif damage == "best file of another iteration":
        torch.save(dict(torch.load(best, weights_only=True), iteration=999), best)
    elif damage == "state truncated":
        data = (resume / "state.pt").read_bytes()
        (resume / "state.pt").write_bytes(data[: len(data) // 2])
    elif damage == "state without best file":
        state = torch.load(resume / "state.pt", weights_only=True)
        del state["best_iteration"]  # the state names its best file by its iteration
        torch.save(state, resume / "state.pt")
    else:  # a kill between the removal of state.pt and the rest at the end of a run
        (resume / "state.pt").unlink()
    run_train(train_data, tmp_path / "run")
    if damage != "only best files":
        assert "is not usable" in caplog.text and "training starts over" in caplog.text
    assert same_weights(tmp_path / "fresh" / "last.pt", tmp_path / "run" / "last.pt")
    assert not resume.exists()


def test_stale_temporaries_of_outputs_and_state_are_removed(train_data, tmp_path, monkeypatch):
    resume = interrupted_run(train_data, tmp_path, monkeypatch, saves=1)
    stale = [
        tmp_path / ".best.tmp-99999.pt",
        tmp_path / ".last.tmp-1.pt",
        tmp_path / ".val.tmp-7.csv",
        resume / ".state.tmp-4242.pt",
        resume / ".best-000000004.tmp-4242.pt",
    ]
    for path in stale:
        path.write_bytes(b"x" * 100)
    unrelated = tmp_path / ".best.tmp-99999.pt.keep"
    unrelated.write_bytes(b"mine")
    run_train(train_data, tmp_path)
    assert not any(path.exists() for path in stale) and unrelated.exists()


def test_checkpoints_are_byte_identical_whatever_the_writers_pid(train_data, tmp_path, monkeypatch):
    run_train(train_data, tmp_path / "a")
    monkeypatch.setattr(os, "getpid", lambda: 4242)
    run_train(train_data, tmp_path / "b")
    for name in ("best.pt", "last.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_finished_runs_leave_no_empty_folders_under_the_resume_root(train_data, tmp_path):
    root = tmp_path / "results" / ".resume"
    (root / "other_dataset").mkdir(parents=True)  # another run's folder stays
    for seed in (0, 1):
        run_train(
            train_data,
            tmp_path / f"out{seed}",
            seed=seed,
            extra=["--resume-dir", str(root / "demo" / "vsepp" / "baseline" / f"seed{seed}")],
        )
    assert sorted(p.name for p in root.iterdir()) == ["other_dataset"]


def test_a_lock_survives_a_folder_removed_under_a_waiting_opener(tmp_path):
    """The holder removes the folder (run finished) while another process has the old lock file
    open: that process must not believe it holds the folder it finds recreated."""
    from pipeline_steps.training.resume import ResumeFolder

    first = ResumeFolder(tmp_path / "r")
    first.lock()
    first.remove()
    second = ResumeFolder(tmp_path / "r")
    second.lock()
    third = ResumeFolder(tmp_path / "r")
    with pytest.raises(Exception, match="in use by another trainer"):
        third.lock()
    second.unlock()


def test_a_state_from_inputs_made_again_is_not_resumed(tmp_path, monkeypatch, caplog):
    """Data prepared again (here another vocabulary) or candidates mined again keep their paths.
    A resume state from before must not be reused: training starts over, as on the new inputs."""
    from pipeline_steps import prepare_data
    from tests.helpers import make_prepared_demo

    data, prepared = make_prepared_demo(tmp_path / "d", 3, 30, 10, 10, ["train", "dev"])
    own = {"data": data, "prepared": prepared}
    rng = np.random.default_rng(1)
    for name, shape, high in (("i2t", (30, 25), 150), ("t2i", (150, 5), 30)):
        own[name] = tmp_path / f"{name}.npy"
        np.save(own[name], rng.integers(0, high, shape).astype(np.int32))
    interrupted_run(own, tmp_path / "run", monkeypatch, variant="offtri")
    prepare_data.main(
        [
            "--data",
            str(data),
            "--out",
            str(prepared),
            "--img-dim",
            "16",
            "--splits",
            "train",
            "dev",
            "--vocab-threshold",
            "1",
        ]
    )  # a larger vocabulary, same paths
    np.save(own["i2t"], rng.integers(0, 150, (30, 25)).astype(np.int32))  # mined again
    run_train(own, tmp_path / "run", "offtri")
    assert "belongs to another configuration" in caplog.text
    run_train(own, tmp_path / "fresh", "offtri")
    assert same_weights(tmp_path / "fresh" / "last.pt", tmp_path / "run" / "last.pt")


def test_a_state_of_a_run_started_from_another_checkpoint_is_not_resumed(train_data, tmp_path, monkeypatch):
    """A run that starts from a checkpoint (--init-from: a later mining round, or the baseline's
    warm-up) and is interrupted must not resume once that checkpoint was trained again under the
    same path: it starts over from the new weights, as a fresh run does."""
    for seed in (0, 1):
        assert run_train(train_data, tmp_path / f"baseline{seed}", seed=seed) == 0
    start = tmp_path / "start.pt"
    start.write_bytes((tmp_path / "baseline0" / "last.pt").read_bytes())
    original, calls = train.Run.save_state, []

    def save_then_die(self):
        original(self)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Run, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(train_data, tmp_path / "run", "offtri", extra=["--init-from", str(start)])
    monkeypatch.setattr(train.Run, "save_state", original)
    start.write_bytes((tmp_path / "baseline1" / "last.pt").read_bytes())  # trained again, same path
    os.utime(start, ns=(time.time_ns(), time.time_ns() + 10**9))
    run_train(train_data, tmp_path / "run", "offtri", extra=["--init-from", str(start)])
    run_train(train_data, tmp_path / "fresh", "offtri", extra=["--init-from", str(start)])
    assert same_weights(tmp_path / "fresh" / "last.pt", tmp_path / "run" / "last.pt")
