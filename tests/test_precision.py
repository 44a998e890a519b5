"""Mixed-precision training (TrainConfig.amp): config checks, and a bf16 CPU run against fp32."""

import math

import pytest

from pipeline_steps import train
from pipeline_steps.training.precision import MixedPrecision
from tests.helpers import train_argv
from tests.test_train import read_log, weights

MODEL = '{"embed_size": 16, "word_dim": 8}'


def run(train_data, out, amp):
    out.mkdir(parents=True, exist_ok=True)
    cfg = (
        '{"epochs": 1, "batch_size": 32, "val_step": 100, "eval_batch_size": 64,'
        f' "offline_size": 20, "amp": "{amp}"}}'
    )
    return train.main(
        train_argv(train_data, out, model_config=MODEL, train_config=cfg, variant="adapoffquin")
    )


def test_modes_are_checked():
    with pytest.raises(ValueError, match="amp must be one of"):
        MixedPrecision("fp8", "cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        MixedPrecision("fp16", "cpu")
    assert MixedPrecision("none", "cpu").should_step(float("inf"))  # fp32: no overflow skipping


def test_bad_amp_in_train_config_is_a_clear_error(train_data, tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        run(train_data, tmp_path, "fp16")


def test_bf16_autocast_trains_close_to_fp32(train_data, tmp_path):
    """bf16 has 8 bits of mantissa: the run must differ from fp32 (autocast is really on) but
    stay close, and the validation rows must be there and finite."""
    assert run(train_data, tmp_path / "fp32", "none") == 0
    assert run(train_data, tmp_path / "bf16", "bf16") == 0
    a, b = weights(tmp_path / "fp32" / "last.pt"), weights(tmp_path / "bf16" / "last.pt")
    diffs = [float((a[k] - b[k]).abs().max()) for k in a]
    assert max(diffs) > 0
    assert all(math.isfinite(d) and d < 0.05 for d in diffs)
    rows = read_log(tmp_path / "bf16" / "val.csv")
    assert rows and all(math.isfinite(float(r["train_loss"])) for r in rows)
