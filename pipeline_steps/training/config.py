"""The settings of a training run (`--train-config`, JSON): TrainConfig, and reading a JSON
config into a dataclass with a one-line refusal."""

import json
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 2e-4
    lr_update: int = 15  # lr x0.1 every lr_update epochs
    grad_clip: float = 2.0  # total-norm clip; <= 0 disables
    val_step: int = 500  # also validate every val_step iterations
    offline_size: int = 300  # offline negatives drawn from the top offline_size candidates
    eval_batch_size: int = 256
    workers: int = 0
    allow_tf32: bool = False  # the reference ran in full fp32 (Q-TF32); True is faster on GPUs
    amp: str = "none"  # none | bf16 | fp16 autocast of forward and loss (common/precision.py)
    # Epochs at the start that sum the online hinge over all in-batch negatives (VSE0) instead of
    # taking the hardest one. 0 = the reference. From random init on weak features the hardest
    # negative can collapse every embedding onto one point; a warm-up epoch (as VSE-infinity's
    # `vse_mean_warmup_epochs`) avoids that. AdapOffQuin's weights need the hardest negative, so
    # its warm-up runs as OffQuin.
    max_violation_warmup_epochs: int = 0
    # Adam's update as PyTorch 0.4.1, which the releases ran, computed it (eps added before v's
    # bias correction; docs/reference_behaviours.md Q-ADAM041). False: today's torch.optim.Adam.
    release_adam: bool = True


def json_config(text, cls, what):
    """`cls` (a dataclass) from a JSON object; a bad one stops with one line naming the fields."""
    try:
        return cls(**json.loads(text))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        known = ", ".join(f.name for f in fields(cls))  # both configs are dataclasses
        raise SystemExit(f"error: bad {what}: {err} (known fields: {known})") from None
