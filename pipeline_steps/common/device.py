"""The torch device a step runs on, from its `--device` option."""

import re

import torch

from pipeline_steps.common.errors import InputError

DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


def pick_device(name):
    """'auto' -> cuda when available, else cpu; 'cpu', 'cuda' and 'cuda:N' as given.

    Raises InputError for any other name, and for a CUDA device this process cannot see.
    """
    if not DEVICE_NAMES.fullmatch(name):
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= visible:
            raise InputError(f"--device {name!r}: this process sees {visible} CUDA device(s)")
    return name
