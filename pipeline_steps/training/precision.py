"""Mixed precision for training steps: autocast around forward and loss, loss scaling for fp16.

`amp` (TrainConfig): "none" (default, full fp32 as the reference, Q-TF32), "bf16" (autocast to
bfloat16 on CUDA, or on CPU where the kernels exist; no loss scaling needed), "fp16" (CUDA only,
with a GradScaler). Losses are computed in float32 whatever the autocast dtype (models/losses.py).
Validation and evaluation always run in fp32. A run with amp is not a parity run.

The scaler is driven by hand rather than by `scaler.step`: the parity mode steps the captioning
Adam twice per iteration (Q-DUP), which `scaler.step` refuses, and clipping must see unscaled
gradients. (Q-... tags: docs/reference_behaviours.md.)
"""

import contextlib
import math

import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    def __init__(self, mode, device):
        if mode not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {mode!r}")
        device = torch.device(device)
        if mode == "fp16" and device.type != "cuda":
            raise ValueError("amp 'fp16' needs a CUDA device (use 'bf16' on CPU)")
        self.dtype, self.device_type = AMP_DTYPES[mode], device.type
        self.scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None

    @property
    def skips_overflow(self):
        """True when inf/NaN gradients are expected now and then (fp16 loss scaling): the step is
        skipped and the scale lowered, instead of stopping the run."""
        return self.scaler is not None

    def autocast(self):
        """Context for the forward pass and the loss."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizers):
        """Bring the gradients back to their true scale (before summing over ranks and clipping)."""
        if self.scaler is not None:
            for optimizer, _ in optimizers.parts:
                self.scaler.unscale_(optimizer)

    def should_step(self, total_norm):
        """False when fp16 gradients overflowed: skip this step (the scaler lowers its scale)."""
        if self.scaler is None:
            return True
        finite = math.isfinite(total_norm)
        self.scaler.update()
        return finite
