"""Multi-process training (pipeline_steps/training/distributed.py) against the single process.

Two gloo processes on the CPU (spawned with torchrun's environment, or by torchrun itself) train
with global batches of 8 split 4 + 4 (each epoch's last batch, 5 items, splits 2 + 3) and must
reproduce one process with the same seed: the loss of every iteration and the final weights to
1e-5 relative. They are not bit-identical: a shard is encoded as a smaller batch and gradients are
summed in another order. Covered: the baseline and AdapOffQuin (offline negatives drawn for the
whole batch), VSE++, SCAN (word features of different lengths per shard) and VSRN (BatchNorm
synchronised, the captioning loss recombined). VSRN's captioning dropout is switched off for the
comparison: each process draws masks for its own rows, the one thing that cannot match the single
process (no model has other randomness in training). With dropout on, a 2-process VSRN run killed
after a validation resumes bit for bit (each rank's random stream is restored). Rank 0 alone
writes outputs and every rank finishes.
"""

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipeline_steps import train
from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches, shard_bounds
from pipeline_steps.data.splits import open_split
from pipeline_steps.training.distributed import Context, Launch, launch_from_env
from tests.helpers import make_prepared_demo

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

TRAIN = '{"epochs": 2, "batch_size": 8, "val_step": 4, "eval_batch_size": 64, "offline_size": 20}'
MODELS = {
    "vsepp": '{"embed_size": 16, "word_dim": 8}',
    "scan": '{"embed_size": 16, "word_dim": 8, "chunk": 3}',
    "vsrn": '{"embed_size": 16, "word_dim": 8, "dim_hidden": 8, "dim_word": 8, "max_len": 8, '
    '"f30k_layout": true}',  # BatchNorm over regions (Rs_GCN) and over the batch (bn)
}
RTOL, ATOL = 1e-5, 1e-6
# The bias of the convolution feeding each Rs_GCN BatchNorm has a gradient that is zero in exact
# arithmetic (training-mode BatchNorm removes any constant shift); Adam turns its rounding noise
# into steps of up to lr, whatever the number of processes. It, and the running mean it shifts, can
# only be held to 2 x lr x 12 steps.
NULL_GRADIENT = (".W.0.bias", ".W.1.running_mean")
REPO = Path(__file__).resolve().parents[1]


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    data, prepared = make_prepared_demo(root, 4, 9, 6, 5, ["train", "dev"])  # 45 training captions
    rng = np.random.default_rng(1)
    i2t, t2i = root / "i2t.npy", root / "t2i.npy"
    np.save(i2t, rng.integers(0, 45, size=(9, 25)).astype(np.int32))
    np.save(t2i, rng.integers(0, 9, size=(45, 5)).astype(np.int32))
    return {"data": data, "prepared": prepared, "i2t": i2t, "t2i": t2i}


def train_args(dataset, out, model, variant):
    args = [
        "--data",
        str(dataset["data"]),
        "--prepared",
        str(dataset["prepared"]),
        "--model",
        model,
        "--model-config",
        MODELS[model],
        "--train-config",
        TRAIN,
        "--loss-config",
        f'{{"variant": "{variant}"}}',
        "--seed",
        "3",
        "--device",
        "cpu",
        "--out-best",
        str(out / "best.pt"),
        "--out-last",
        str(out / "last.pt"),
        "--out-log",
        str(out / "val.csv"),
        "--resume-dir",
        str(out / "resume"),
    ]
    if variant != "baseline":
        args += ["--candidates-i2t", str(dataset["i2t"]), "--candidates-t2i", str(dataset["t2i"])]
    return args


def instrument(setattr, kill_after_saves=0, dropout=False):
    """Record each iteration's loss and the model; switch dropout off unless `dropout`; optionally
    die after the kill_after_saves-th save of the resume state."""
    trace = {"losses": []}
    loss_of, create, save_state = train.training_loss, train.create_model, train.Run.save_state

    def recording_loss(model, *args, **kwargs):
        loss, terms = loss_of(model, *args, **kwargs)
        trace["losses"].append(loss.item())
        trace["model"] = model
        return loss, terms

    def create_without_dropout(*args, **kwargs):
        model = create(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model

    def save_then_die(run):
        save_state(run)
        trace["saves"] = trace.get("saves", 0) + 1
        if trace["saves"] == kill_after_saves:
            raise Killed

    setattr(train, "training_loss", recording_loss)
    if not dropout:
        setattr(train, "create_model", create_without_dropout)
    if kill_after_saves:
        setattr(train.Run, "save_state", save_then_die)
    return trace


def _process(rank, world_size, port, argv, trace_dir, kill_after_saves, dropout):
    """One spawned process: torchrun's environment, then the real train.main."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    trace = instrument(setattr, kill_after_saves, dropout)
    try:
        train.main(argv)
    except Killed:
        dist.destroy_process_group()
    torch.save(
        {"losses": trace["losses"], "weights": trace["model"].state_dict()},
        os.path.join(trace_dir, f"rank{rank}.pt"),
    )


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two(argv, trace_dir, kill_after_saves=0, dropout=False):
    trace_dir.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(
        _process, nprocs=2, join=True, args=(2, free_port(), argv, str(trace_dir), kill_after_saves, dropout)
    )
    return [torch.load(trace_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def run_one(dataset, out, model, variant, monkeypatch):
    with monkeypatch.context() as patch:
        trace = instrument(patch.setattr)
        train.main(train_args(dataset, out, model, variant))
    return trace


def assert_close_weights(got, want):
    assert got.keys() == want.keys()
    for key in want:
        atol = 2 * 2e-4 * 12 if key.endswith(NULL_GRADIENT) else ATOL
        torch.testing.assert_close(got[key], want[key], rtol=RTOL, atol=atol, msg=key)


def log_rows(path):
    with open(path, newline="") as handle:
        return [(r["epoch"], r["iteration"]) for r in csv.DictReader(handle)]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned processes


@pytest.mark.parametrize(
    "model,variant",
    [("vsepp", "baseline"), ("vsepp", "adapoffquin"), ("scan", "adapoffquin"), ("vsrn", "adapoffquin")],
)
def test_two_processes_match_one(dataset, tmp_path, monkeypatch, model, variant):
    single = run_one(dataset, tmp_path / "one", model, variant, monkeypatch)
    ranks = run_two(train_args(dataset, tmp_path / "two", model, variant), tmp_path / "trace")
    assert len(single["losses"]) == 12  # 6 batches an epoch, 2 epochs
    for rank in ranks:  # every rank computes the whole batch's loss
        np.testing.assert_allclose(rank["losses"], single["losses"], rtol=RTOL)
    assert all(torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]) for k in ranks[0]["weights"])
    assert_close_weights(ranks[0]["weights"], single["model"].state_dict())
    assert_close_weights(
        torch.load(tmp_path / "two" / "last.pt", weights_only=True)["state_dict"],
        torch.load(tmp_path / "one" / "last.pt", weights_only=True)["state_dict"],
    )
    assert log_rows(tmp_path / "two" / "val.csv") == log_rows(tmp_path / "one" / "val.csv")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.pt", "last.pt", "val.csv"]


def test_two_processes_resume_after_a_kill_exactly(dataset, tmp_path):
    argv = train_args(dataset, tmp_path / "full", "vsrn", "adapoffquin")
    full = run_two(argv, tmp_path / "trace_full", dropout=True)
    argv = train_args(dataset, tmp_path / "two", "vsrn", "adapoffquin")
    run_two(argv, tmp_path / "trace_killed", kill_after_saves=2, dropout=True)  # after iteration 6
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["resume"]  # no outputs yet
    kept = sorted(p.name for p in (tmp_path / "two" / "resume").iterdir())
    assert kept[0] == ".lock" and kept[1].startswith("best-") and kept[2:] == ["state.pt"], kept
    resumed = run_two(argv, tmp_path / "trace_resumed", dropout=True)
    for rank in range(2):
        assert resumed[rank]["losses"] == full[rank]["losses"][6:]
    for name in ("best.pt", "last.pt"):
        got = torch.load(tmp_path / "two" / name, weights_only=True)["state_dict"]
        want = torch.load(tmp_path / "full" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "two" / "val.csv").read_text() == (tmp_path / "full" / "val.csv").read_text()
    assert not (tmp_path / "two" / "resume").exists()


def test_torchrun_launch_writes_once_and_matches(dataset, tmp_path, monkeypatch):
    run_one(dataset, tmp_path / "one", "vsepp", "baseline", monkeypatch)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pipeline_steps.train",
        *train_args(dataset, tmp_path / "two", "vsepp", "baseline"),
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0] train VAL" in done.stderr and "[rank 1]" not in done.stderr  # rank 1 logs warnings only
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.pt", "last.pt", "val.csv"]
    assert_close_weights(
        torch.load(tmp_path / "two" / "last.pt", weights_only=True)["state_dict"],
        torch.load(tmp_path / "one" / "last.pt", weights_only=True)["state_dict"],
    )


def test_shards_of_a_batch_are_the_batch(dataset):
    features, captions, info = open_split(dataset["data"], dataset["prepared"], "train")
    candidates = OfflineCandidates(dataset["i2t"], dataset["t2i"], info.n_images, 20)
    batches = epoch_batches(info.n_captions, 8, 3, 1)

    def items(shard):
        data = TrainBatches(features, captions, batches, 3, 1, candidates, shard=shard)
        return [data[b] for b in range(len(data))]

    whole, shards = items((0, 1)), [items((r, 3)) for r in range(3)]
    for b, batch in enumerate(whole):  # 8 = 2 + 3 + 3 and the last batch 5 = 1 + 2 + 2
        for key in ("index", "images", "lengths", "neg_images", "neg_lengths", "pos2_images", "pos2_lengths"):
            assert torch.equal(torch.cat([shard[b][key] for shard in shards]), batch[key]), key
        for key in ("ids", "neg_ids", "pos2_ids"):  # each shard is padded to its own longest caption
            parts = [shard[b][key] for shard in shards]
            width = batch[key].shape[1]
            assert torch.equal(
                torch.cat([nn.functional.pad(x, (0, width - x.shape[1])) for x in parts]), batch[key]
            ), key


def test_too_few_items_for_the_processes_is_refused():
    ctx = Context(rank=0, world_size=4)
    with pytest.raises(SystemExit, match="last one"):
        ctx.check_batch_split(45, 7)  # last batch of 3 items for 4 processes
    ctx.check_batch_split(45, 8)  # last batch of 5


@pytest.mark.parametrize("n,world", [(8, 2), (5, 2), (128, 8), (35, 8), (4, 4)])
def test_shards_are_contiguous_and_cover_the_batch(n, world):
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    if n % world == 0:
        assert bounds == [(r * n // world, (r + 1) * n // world) for r in range(world)]


def test_launch_from_environment():
    assert launch_from_env({}) is None
    assert launch_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(1, 4, 1)
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NODELIST": "gpu[03-06]",
        "SLURM_JOB_ID": "123456",
    }
    hosts = {"gpu[03-06]": "gpu03"}
    assert launch_from_env(slurm, hosts.get) == Launch(5, 8, 1, "gpu03", "23456")
    mine = slurm | {"MASTER_ADDR": "head", "MASTER_PORT": "29400", "SLURM_STEP_NUM_TASKS": "4"}
    assert launch_from_env(mine, hosts.get) == Launch(5, 4, 1, "head", "29400")
    # the batch script itself (no srun step, or Slurm's batch step id) stays one process
    assert launch_from_env({k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}, hosts.get) is None
    assert launch_from_env(slurm | {"SLURM_STEP_ID": str(0xFFFFFFFE)}, hosts.get) is None
