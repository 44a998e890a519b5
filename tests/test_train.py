"""The training step on tiny generated data: outputs, seeding, and exact resume after a kill."""

import csv

import pytest
import torch

from pipeline_steps import train
from tests.helpers import train_argv

TRAIN = '{"epochs": 2, "batch_size": 32, "val_step": 4, "eval_batch_size": 64, "offline_size": 20}'


MODEL_CONFIGS = {
    "vsepp": '{"embed_size": 16, "word_dim": 8}',
    "vsrn": '{"embed_size": 16, "word_dim": 8, "dim_hidden": 8, "dim_word": 8, "max_len": 20}',
}


def run_train(train_data, out, variant="baseline", seed=0, extra=(), model="vsepp"):
    out.mkdir(parents=True, exist_ok=True)
    argv = train_argv(train_data, out, model, MODEL_CONFIGS[model], TRAIN, variant, seed)
    return train.main(argv + list(extra))


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def read_log(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    "model,variant", [("vsepp", "baseline"), ("vsepp", "adapoffquin"), ("vsrn", "adapoffquin")]
)
def test_outputs_and_validation_rows(train_data, tmp_path, model, variant):
    run_train(train_data, tmp_path, variant, model=model)
    rows = read_log(tmp_path / "val.csv")
    # 150 captions / 32 = 5 batches an epoch: validations at iteration 4 and each epoch end,
    # plus iteration 8 in epoch 1.
    assert [int(r["iteration"]) for r in rows] == [4, 5, 8, 10]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    scores = [float(r["val_score4"]) for r in rows]
    assert best["val_score4"] == pytest.approx(max(scores), abs=1e-3)
    assert best["iteration"] == int(rows[scores.index(max(scores))]["iteration"])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["iteration"] == 10
    assert not (tmp_path / "resume").exists()  # finished runs leave no resume state


def test_same_seed_same_numbers_other_seed_differs(train_data, tmp_path):
    run_train(train_data, tmp_path / "a", seed=1)
    run_train(train_data, tmp_path / "b", seed=1)
    run_train(train_data, tmp_path / "c", seed=2)
    assert same_weights(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert read_log(tmp_path / "a" / "val.csv") == read_log(tmp_path / "b" / "val.csv")
    assert not same_weights(tmp_path / "a" / "last.pt", tmp_path / "c" / "last.pt")


class Killed(Exception):
    pass


@pytest.mark.parametrize(
    "model,variant,kill_after_saves",
    [("vsepp", "baseline", 1), ("vsepp", "adapoffquin", 2), ("vsrn", "adapoffquin", 1)],
)
def test_resume_after_kill_matches_uninterrupted_run(
    train_data, tmp_path, monkeypatch, model, variant, kill_after_saves
):
    run_train(train_data, tmp_path / "full", variant, model=model)
    original, calls = train.Run.save_state, []

    def save_then_die(self):
        original(self)
        calls.append(1)
        if len(calls) == kill_after_saves:
            raise Killed

    monkeypatch.setattr(train.Run, "save_state", save_then_die)
    with pytest.raises(Killed):
        run_train(train_data, tmp_path / "killed", variant, model=model)
    assert not (tmp_path / "killed" / "last.pt").exists()
    assert (tmp_path / "killed" / "resume" / "state.pt").exists()
    monkeypatch.setattr(train.Run, "save_state", original)
    run_train(train_data, tmp_path / "killed", variant, model=model)
    for name in ("best.pt", "last.pt"):
        assert same_weights(tmp_path / "full" / name, tmp_path / "killed" / name)
    assert read_log(tmp_path / "full" / "val.csv") == read_log(tmp_path / "killed" / "val.csv")


def test_resume_state_of_another_config_is_ignored(train_data, tmp_path, monkeypatch):
    original = train.Run.save_state

    def save_then_die(self):
        original(self)
        raise Killed

    monkeypatch.setattr(train.Run, "save_state", save_then_die)
    with pytest.raises(Killed):
        run_train(train_data, tmp_path / "x", seed=5)
    monkeypatch.setattr(train.Run, "save_state", original)
    run_train(train_data, tmp_path / "x", seed=6)  # same folder, other seed: must start over
    run_train(train_data, tmp_path / "y", seed=6)
    assert same_weights(tmp_path / "x" / "last.pt", tmp_path / "y" / "last.pt")
    assert read_log(tmp_path / "x" / "val.csv") == read_log(tmp_path / "y" / "val.csv")


def test_aoq_variant_without_candidates_is_refused(train_data, tmp_path):
    with pytest.raises(SystemExit, match="needs --candidates"):
        train.main(
            [
                "--data",
                str(train_data["data"]),
                "--prepared",
                str(train_data["prepared"]),
                "--model",
                "vsepp",
                "--loss-config",
                '{"variant": "offtri"}',
                "--out-best",
                "b",
                "--out-last",
                "l",
                "--out-log",
                "v",
                "--resume-dir",
                str(tmp_path / "r"),
            ]
        )


def test_unknown_config_field_is_a_clear_error(train_data, tmp_path):
    with pytest.raises(SystemExit, match="bad --train-config.*known fields"):
        run_train(train_data, tmp_path, extra=["--train-config", '{"epochz": 3}'])


@pytest.mark.parametrize(
    "variant,warm_variant", [("baseline", "baseline"), ("offtri", "offtri"), ("adapoffquin", "offquin")]
)
def test_warmup_epochs_use_all_negatives_without_adaptive_weights(variant, warm_variant):
    from models.losses import LossConfig

    loss = LossConfig(variant=variant, alpha=0.4)
    cfg = train.TrainConfig(max_violation_warmup_epochs=2)
    for epoch in (0, 1):
        warm = train.loss_config_at_epoch(loss, cfg, epoch)
        assert (warm.variant, warm.max_violation, warm.alpha) == (warm_variant, False, 0.4)
    assert train.loss_config_at_epoch(loss, cfg, 2) == loss
    assert train.loss_config_at_epoch(loss, train.TrainConfig(), 0) == loss  # reference default


def test_warmup_changes_training(train_data, tmp_path):
    run_train(train_data, tmp_path / "ref")
    run_train(
        train_data,
        tmp_path / "warm",
        extra=["--train-config", TRAIN[:-1] + ', "max_violation_warmup_epochs": 1}'],
    )
    assert not same_weights(tmp_path / "ref" / "last.pt", tmp_path / "warm" / "last.pt")


def test_warm_start_takes_the_weights_of_a_matching_checkpoint_only(tmp_path):
    """A later mining round starts from the previous round's weights (mining.warm_start)."""
    from models import create_model
    from pipeline_steps.training.checkpoint import CheckpointError, save_checkpoint, warm_start

    torch.manual_seed(0)
    source = create_model("vsepp", vocab_size=20, img_dim=16, embed_size=12, word_dim=8)
    save_checkpoint(tmp_path / "round1.pt", source)
    torch.manual_seed(1)
    target = create_model("vsepp", vocab_size=20, img_dim=16, embed_size=12, word_dim=8)
    assert any(
        not torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values())
    )
    warm_start(target, tmp_path / "round1.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    other = create_model("vsepp", vocab_size=20, img_dim=16, embed_size=16, word_dim=8)
    with pytest.raises(CheckpointError, match="round1.pt: a vsepp checkpoint with config .* cannot start"):
        warm_start(other, tmp_path / "round1.pt")


def test_a_run_cut_at_the_warmup_is_the_baselines_first_epochs(train_data, tmp_path, monkeypatch):
    """aoq.start_from: baseline_warmup starts AOQ from a baseline run cut at its warm-up's end
    (workflow/plan.py). Its weights must be the ones the full baseline run has at that point:
    captured here from the full run's resume state after epoch 1, and compared exactly."""
    warmup = '"max_violation_warmup_epochs": 1, "batch_size": 32, "val_step": 4, "eval_batch_size": 64'
    at_warmup_end = {}
    original = train.Run.save_state

    def capture(self):
        if not at_warmup_end and (self.epoch, self.next_batch) == (1, 0):
            at_warmup_end.update({k: v.clone() for k, v in self.model.state_dict().items()})
        original(self)

    monkeypatch.setattr(train.Run, "save_state", capture)
    for name, epochs in (("full", 3), ("cut", 1)):
        out = tmp_path / name
        out.mkdir()
        argv = train_argv(
            train_data, out, "vsepp", MODEL_CONFIGS["vsepp"], f'{{"epochs": {epochs}, {warmup}}}'
        )
        assert train.main(argv + ["--threads", "1"]) == 0
    cut = weights(tmp_path / "cut" / "last.pt")
    assert cut.keys() == at_warmup_end.keys()
    assert all(torch.equal(cut[k], at_warmup_end[k]) for k in cut)
    full, first = read_log(tmp_path / "full" / "val.csv"), read_log(tmp_path / "cut" / "val.csv")
    assert len(full) > len(first) and full[: len(first)] == first
