"""Where a result came from: the code's commit, the library versions, the device, and a digest of
a model's weights. Every metrics JSON carries this (docs/evaluation.md#provenance), so a number in
a report can be traced to the code and settings that produced it."""

import hashlib
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]


def _git(*args):
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def code_version():
    """{"git_commit": sha or "unknown", "git_dirty": bool or None}. Dirty means tracked files differ
    from the commit (untracked files, e.g. results/, do not count)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit or "unknown", "git_dirty": None if status is None else bool(status)}


def provenance(device, settings_digest=None, tokenizer=None):
    """The run's provenance: code version, settings digest, versions, device, tokenizer."""
    return {
        **code_version(),
        "settings_digest": settings_digest,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "tokenizer": tokenizer,
    }


def weights_digest(model):
    """sha256 (16 hex digits) of a model's parameters and buffers, in state_dict order: equal for
    equal weights, whatever the checkpoint's other fields (loss config, run names) say."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
