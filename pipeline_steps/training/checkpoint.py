"""Checkpoints that describe themselves and load without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values: model name and config, weights, and
whatever the training step adds (epoch, iteration, scores, configs). `torch.load` runs with
`weights_only=True`. The bytes of a saved file depend only on what it holds (the same run gives
the same file), not on the temporary name it was written under.
"""

import pickle

import torch

from models import create_model
from pipeline_steps.common.atomic import atomic_path
from pipeline_steps.common.errors import InputError

FORMAT = "aoq-pipeline-checkpoint/1"


class CheckpointError(InputError):
    """A file is not a checkpoint this pipeline reads (unreadable, refused content, other format)."""


def save_torch(path, payload):
    """torch.save `payload` atomically. Written through a file object: torch names the archive
    inside a zip after the file it saves to, and the temporary name holds the writer's PID."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)


def load_torch(path, error=CheckpointError, **kwargs):
    """torch.load(weights_only=True) on the CPU; any failure is one `error` line naming `path`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise error(
            f"{path}: refused: holds objects other than tensors and plain values "
            f"(weights-only load: {detail})"
        ) from None
    except Exception as err:  # noqa: BLE001 (random bytes raise IndexError, KeyError, ...: all mean one thing)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"{path}: not a readable checkpoint ({first})") from None


def save_checkpoint(path, model, **extra):
    save_torch(
        path,
        {
            "format": FORMAT,
            "model_name": model.name,
            "model_config": model.config_dict,
            "state_dict": model.state_dict(),
            **extra,
        },
    )


def load_checkpoint(path, device="cpu"):
    """Return (model in eval mode on `device`, the checkpoint dict); CheckpointError if refused."""
    checkpoint = load_torch(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (format {FORMAT})")
    try:
        model = create_model(checkpoint["model_name"], **checkpoint["model_config"])
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a complete checkpoint of this pipeline ({first})") from None
    model.to(device).eval()
    return model, checkpoint


def warm_start(model, path):
    """Give `model` the weights of a checkpoint of the same architecture and config (a later
    mining round starting from the previous round's model; the optimizer starts afresh)."""
    checkpoint = load_torch(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this pipeline (format {FORMAT})")
    if (checkpoint["model_name"], checkpoint["model_config"]) != (model.name, model.config_dict):
        raise CheckpointError(
            f"{path}: a {checkpoint['model_name']} checkpoint with config {checkpoint['model_config']} "
            f"cannot start a {model.name} run with config {model.config_dict}"
        )
    model.load_state_dict(checkpoint["state_dict"])
