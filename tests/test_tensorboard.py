"""TensorBoard logging of the training step (--tensorboard-dir) and of the workflow
(`tensorboard: true` in a training section): the tags, their steps against the step's own CSV
log, and that toggling it reruns nothing."""

import copy
import csv
import json
import shlex

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models.losses import LossConfig, OfflineScores, adaptive_weights, hinge, retrieval_loss
from pipeline_steps import train
from tests.helpers import planned_jobs, snakemake, tiny_config, train_argv

# 150 captions / 32 = 5 batches an epoch, 2 epochs: iterations 1..10, validations at 4, 5, 8, 10.
TRAIN = '{"epochs": 2, "batch_size": 32, "val_step": 4, "eval_batch_size": 64, "offline_size": 20}'
# The same, with a first epoch that sums over all negatives (AdapOffQuin trains it as OffQuin).
TRAIN_WARM = TRAIN[:-1] + ', "max_violation_warmup_epochs": 1}'
ITERATIONS = list(range(1, 11))
VAL_METRICS = [f"{d}_{m}" for d in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")]
VAL_METRICS += ["rsum", "val_score4"]


def train_with_board(train_data, out, variant, train_config=TRAIN):
    out.mkdir(parents=True, exist_ok=True)
    argv = train_argv(train_data, out, train_config=train_config, variant=variant)
    train.main(argv + ["--tensorboard-dir", str(out / "board")])
    with open(out / "val.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, read_board(out / "board")


def read_board(folder):
    """{tag: {step: value}} of every scalar TensorBoard shows for `folder`."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    board = {}
    for tag in events.Tags()["scalars"]:
        steps = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len({s for s, _ in steps}) == len(steps), f"{tag}: a step logged twice"
        board[tag] = dict(steps)
    return board


@pytest.mark.parametrize(
    "variant,terms,weighted",
    [
        ("baseline", ["online"], []),
        # The adaptive weights exist in the second epoch only: the first is a warm-up.
        ("adapoffquin", ["online", "offline_triplet", "quintuplet"], list(range(6, 11))),
    ],
)
def test_tags_and_steps_match_the_run(train_data, tmp_path, variant, terms, weighted):
    rows, board = train_with_board(train_data, tmp_path, variant, TRAIN_WARM)
    term_tags = [f"loss/{t}" for t in terms]
    expected = {"loss/total", "train/lr", *term_tags, *(f"val/{m}" for m in VAL_METRICS)}
    assert set(board) == expected | ({"train/adaptive_weight_mean"} if weighted else set())
    for tag in ["loss/total", "train/lr", *term_tags]:
        assert list(board[tag]) == ITERATIONS, tag
    if weighted:
        assert list(board["train/adaptive_weight_mean"]) == weighted
    validated = [int(r["iteration"]) for r in rows]
    assert validated == [4, 5, 8, 10]
    for metric in VAL_METRICS:
        assert list(board[f"val/{metric}"]) == validated, metric
    total = board["loss/total"]
    for step in ITERATIONS:  # the terms add up to the loss (float32 on disk)
        assert sum(board[t][step] for t in term_tags) == pytest.approx(total[step], rel=1e-5, abs=1e-5)
    previous = 0
    for row, step in zip(rows, validated):  # the CSV's loss: the mean since the last validation
        mean = sum(total[s] for s in range(previous + 1, step + 1)) / (step - previous)
        assert mean == pytest.approx(float(row["train_loss"]), rel=1e-5)
        assert board["train/lr"][step] == pytest.approx(float(row["lr"]))
        for metric in ("i2t_r1", "t2i_r5", "rsum", "val_score4"):
            assert board[f"val/{metric}"][step] == pytest.approx(float(row[metric]), abs=1e-3)
        previous = step


def test_a_rerun_into_the_same_folder_replaces_the_old_curves(train_data, tmp_path):
    train_with_board(train_data, tmp_path / "a", "baseline")
    _, board = train_with_board(train_data, tmp_path / "a", "baseline")  # read_board: no step twice
    assert list(board["loss/total"]) == ITERATIONS
    assert len(list((tmp_path / "a" / "board").glob("events.out.tfevents.*"))) == 2


def test_logged_weight_mean_is_the_mean_of_the_weights_the_loss_used():
    torch.manual_seed(0)
    scores = torch.rand(6, 6)
    offline = OfflineScores(*torch.rand(4, 6))
    cfg = LossConfig(variant="adapoffquin")
    _, terms = retrieval_loss(scores, offline, cfg)
    w_t, w_i = adaptive_weights(scores, offline, cfg)
    masked = scores - 10 * torch.eye(6)  # hardest negatives as the reference's weights take them
    positive = scores.diagonal()
    online = (w_t * hinge(0.2, masked.max(1).values, positive)).sum()
    online += (w_i * hinge(0.2, masked.max(0).values, positive)).sum()
    assert terms["online"].item() == pytest.approx(online.item(), rel=1e-6)
    expected_t = 1.5 - (offline.off_t - masked.max(1).values) / 0.3
    assert torch.allclose(w_t, expected_t)


def one_vsepp_seed():
    """tiny_config with one model, vsepp, which also mines, and one seed."""
    config = tiny_config()
    config["mining"]["model"] = "vsepp"
    config["run"]["seeds"] = [0]
    return config


def printed_train_commands(result):
    """{variant: (--train-config as a dict, --tensorboard-dir or None)} of a dry run's commands."""
    commands = {}
    for line in result.stdout.splitlines():
        if "pipeline_steps.train" in line:
            words = shlex.split(line.split(">", 1)[0])
            value = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
            variant = json.loads(value["--loss-config"])["variant"]
            commands[variant] = json.loads(value["--train-config"]), value.get("--tensorboard-dir")
    return commands


@pytest.mark.workflow
def test_the_rule_passes_the_flag_only_to_the_rounds_that_ask(tmp_path):
    config = one_vsepp_seed()
    config["aoq"]["train"]["tensorboard"] = True
    result = snakemake(tmp_path, config, "-n", "-p")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    commands = printed_train_commands(result)
    assert set(commands) == {"baseline", *config["aoq"]["variants"]}
    for variant, (train_config, folder) in commands.items():
        assert "tensorboard" not in train_config
        expected = None if variant == "baseline" else f"logs/demo_precomp/tensorboard/vsepp/{variant}/seed0"
        assert folder == expected


@pytest.mark.workflow
def test_toggling_tensorboard_reruns_no_training(tmp_path):
    config = one_vsepp_seed()
    config["baseline"]["train"]["tensorboard"] = True
    target = "results/demo_precomp/train/vsepp/baseline/seed0/model_best.pt"
    result = snakemake(tmp_path, config, target)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    board = read_board(tmp_path / "logs" / "demo_precomp" / "tensorboard" / "vsepp" / "baseline" / "seed0")
    assert list(board["loss/total"]) == [1, 2, 3, 4]  # 200 captions in batches of 50, one epoch
    off = copy.deepcopy(config)
    del off["baseline"]["train"]["tensorboard"]
    for toggled in (off, config):
        dry = snakemake(tmp_path, toggled, "-n", target)
        assert dry.returncode == 0 and not planned_jobs(dry), dry.stdout[-3000:]
