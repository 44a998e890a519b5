"""`python -m accel`: which accelerated paths run here, and whether their C kernels are compiled.

Prints one line per path: on (and why), or off (and why), then where the compiled libraries are
cached. Exit status 0 either way: a machine without a compiler runs everything, only slower.
"""

import platform
import sys

import torch

import accel
from accel import build, gru, topk


def report():
    lines = [
        f"accelerated paths: {'on' if accel.enabled() else 'off (AOQ_NO_ACCEL is set)'}",
        f"machine: {platform.machine()}, {platform.system()}; torch {torch.__version__}; "
        f"C compiler: {build.compiler() or 'none found (set $CC)'}",
    ]
    kernels = {
        "gru_cell.c (GRU cell, training)": gru.cell_kernels,
        "topk.c (mining top-k, evaluation ranks)": topk.load_kernel,
    }
    for name, load in kernels.items():
        state = "compiled" if load() is not None else "not available: the torch path runs"
        lines.append(f"  {name}: {state}")
    on = accel.enabled()
    lines += [
        f"  GRU recurrence on the CPU (accel.gru): {'on' if on else 'off'}",
        f"  row-skipping linear backward (accel.linear): {'on' if on else 'off'}",
        f"  l2norm backward (accel.l2norm): {'on' if on else 'off'}",
        f"  cross-attention pair backward (accel.pairs): {'on' if on else 'off'}",
        f"kernel cache: {build.cache_dir()}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
