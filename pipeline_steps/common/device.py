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


def set_tf32(allowed):
    """Allow TF32 tensor-core arithmetic in matrix products and cuDNN (GRUs, convolutions), or not.

    torch allows it in cuDNN by default, so without this an evaluation on an Ampere or Hopper GPU
    would encode with 10-bit mantissas where the reference ran in full fp32 (Q-TF32,
    docs/reference_behaviours.md). Training sets it from `allow_tf32`; the other steps turn it off.
    """
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
