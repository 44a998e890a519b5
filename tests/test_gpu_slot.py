"""The GPU slot wrapper on CPU: concurrent jobs get distinct devices, a slot is reused once released,
a crash releases it, and jobs under SLURM or without GPUs run untouched."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The child reports the devices it sees and when it started, sleeps, then reports when it ended.
CHILD = (
    "import os, sys, time; print(os.environ.get('CUDA_VISIBLE_DEVICES', '-'), time.time(), "
    "flush=True); time.sleep(float(sys.argv[1])); print(time.time(), flush=True)"
)


def clean_env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "AOQ_LOCAL_GPUS")
    }
    return {**env, "PYTHONPATH": str(REPO), **extra}


def start(lock_dir, gpus, sleep, slots=None, child=CHILD, **env):
    cmd = [sys.executable, "-m", "pipeline_steps.gpu_slot", "--gpus", str(gpus), "--lock-dir", str(lock_dir)]
    cmd += ["--slots", str(slots)] if slots is not None else []
    cmd += ["--", sys.executable, "-c", child, str(sleep)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(**env)
    )


def started(proc):
    """(devices, start time) once the child runs.

    Reads the first line a byte at a time from the pipe itself: a buffered readline may read ahead
    the child's second line, which communicate() (reading the raw pipe) would then never see."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(proc.stdout.fileno(), 1)
        if not byte:
            break
        line += byte
    devices, at = line.decode().split()
    return devices, float(at)


def finished(proc):
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return float(out.split()[-1])


def test_concurrent_jobs_get_distinct_slots(tmp_path):
    procs = [start(tmp_path, 1, 3, slots=3) for _ in range(3)]
    runs = [started(p) for p in procs]
    ends = [finished(p) for p in procs]
    assert sorted(devices for devices, _ in runs) == ["0", "1", "2"]
    assert max(at for _, at in runs) < min(ends)  # all three held a slot at the same time


def test_a_released_slot_is_taken_by_the_waiting_job(tmp_path):
    short, long = start(tmp_path, 1, 0.5, slots=2), start(tmp_path, 1, 4, slots=2)
    (short_dev, _), (long_dev, _) = started(short), started(long)
    waiting = start(tmp_path, 1, 0, slots=2)
    devices, at = started(waiting)
    short_end = finished(short)
    assert devices == short_dev != long_dev
    assert short_end <= at < finished(long)
    finished(waiting)


def test_several_gpus_per_job(tmp_path):
    first, second = start(tmp_path, 2, 1, slots=4), start(tmp_path, 2, 1, slots=4)
    seen = [started(first)[0].split(","), started(second)[0].split(",")]
    # two devices each, none shared (which two depends on how the two jobs' locking interleaves)
    assert all(len(devices) == 2 for devices in seen)
    assert sorted(seen[0] + seen[1]) == ["0", "1", "2", "3"]
    finished(first), finished(second)


def test_killed_or_crashed_job_releases_its_slot(tmp_path):
    holder = start(tmp_path, 1, 60, slots=1)
    assert started(holder)[0] == "0"
    holder.send_signal(signal.SIGKILL)  # the wrapper exec'd the child: same process
    holder.wait(timeout=10)
    crashing = start(tmp_path, 1, 0, slots=1, child="import sys; sys.exit(3)")
    assert crashing.wait(timeout=30) == 3  # the command's exit status passes through
    t0 = time.time()
    after = start(tmp_path, 1, 0, slots=1)
    assert started(after)[0] == "0" and time.time() - t0 < 10
    finished(after)


def test_user_visible_devices_are_the_slots(tmp_path):
    procs = [start(tmp_path, 1, 3, CUDA_VISIBLE_DEVICES="4,6") for _ in range(2)]
    assert sorted(started(p)[0] for p in procs) == ["4", "6"]
    [finished(p) for p in procs]


@pytest.mark.parametrize(
    "gpus, env, expected",
    [
        (1, {"SLURM_JOB_ID": "12", "CUDA_VISIBLE_DEVICES": "3"}, "3"),  # SLURM chose the device
        (1, {"SLURM_JOB_ID": "12"}, "-"),
        (0, {}, "-"),  # no GPU: nothing to choose
        (1, {"AOQ_LOCAL_GPUS": "0"}, "-"),  # none on this machine
    ],
)
def test_jobs_left_alone(tmp_path, gpus, env, expected):
    proc = start(tmp_path, gpus, 0, **env)
    assert started(proc)[0] == expected
    finished(proc)
    assert not list(tmp_path.glob("*.lock"))


def test_more_gpus_than_the_machine_has_is_an_error(tmp_path):
    proc = start(tmp_path, 3, 0, slots=2)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "has 2" in err
