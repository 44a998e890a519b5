"""Checkpoints that describe themselves and load without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values: model name and config, weights, and
whatever the training step adds (epoch, iteration, scores, configs). `torch.load` runs with
`weights_only=True`.
"""
import torch

from models import create_model
from pipeline_steps.common.atomic import atomic_path

FORMAT = "aoq-pipeline-checkpoint/1"


def save_checkpoint(path, model, **extra):
    payload = {"format": FORMAT, "model_name": model.name, "model_config": model.config_dict,
               "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path, device="cpu"):
    """Return (model in eval mode on `device`, the checkpoint dict)."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this pipeline (format {FORMAT})")
    model = create_model(checkpoint["model_name"], **checkpoint["model_config"]).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, checkpoint


def pick_device(name):
    """'auto' -> cuda when available, else cpu; otherwise the name as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name
