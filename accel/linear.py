"""A linear map whose backward leaves out the rows that receive no gradient.

Why: in an AOQ step the offline passes (I3/T3, I4/T4) feed hinge terms, and a hinge that is not
violated sends exactly zero gradient to its whole image or caption. With the quintuplet term
(m_off + s(I4, T4) - s(I, T))_+ that is about half of the I4/T4 rows at initialisation and most of
them once the model ranks its positives first. A zero row of the incoming gradient adds nothing
to dW = G^T X, db = sum G or dX = G W, so those products run on the rows with a gradient only: a
(active x out) by (active x in) product instead of (rows x out) by (rows x in).

The result is the dense one up to float rounding (fewer rows change the products' blocking, not
the terms), with one deliberate difference: a row without a gradient contributes nothing even
where its input is not finite, where plain autograd would turn 0 x inf into NaN in dW. (A NaN
that reaches the loss still propagates: its rows then have a NaN gradient, which counts as
nonzero.) Used on the CPU outside autocast (`applies`); elsewhere the callers use F.linear.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import accel

DENSE_ABOVE = 0.95  # active fraction above which gathering the rows costs more than it saves


def applies(x):
    """Whether `linear` is used for input x: accelerated paths on, CPU, float32 or float64, no
    autocast (the GRU's backward skips the same rows in every dtype, so float32 and float64 runs
    agree)."""
    return (
        accel.enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias) for x (..., in); backward over the rows with a gradient only."""
    if not (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return F.linear(x, weight, bias)
    return _RowSkippingLinear.apply(x, weight, bias)


def active_rows(grad):
    """Indices (int64) of the rows of grad (rows, features) with any nonzero entry, or None
    when every row has one (found cheaply in the usual dense case: no first entry is zero)."""
    if len(grad) == 0 or bool(grad[:, 0].ne(0).all()):
        return None
    rows = nonzero_rows(grad).nonzero().squeeze(1)
    return None if len(rows) == len(grad) else rows


def nonzero_rows(grad):
    """Bool (rows,): whether each row of grad (rows, features) has an entry other than 0 (NaN
    counts). Two reductions, max and min: about ten times faster than ne(0).any(1), which
    writes a mask of the whole tensor first."""
    return grad.amax(dim=1).ne(0) | grad.amin(dim=1).ne(0)


class _RowSkippingLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        active = active_rows(g)
        if active is not None and len(active) <= DENSE_ABOVE * len(g):
            g = g.index_select(0, active)
        else:
            active = None
        grad_x = grad_w = grad_b = None
        if need_x:
            part = g @ weight
            grad_x = (
                part
                if active is None
                else torch.zeros_like(rows, dtype=part.dtype).index_copy_(0, active, part)
            )
            grad_x = grad_x.view(x.shape)
        if need_w:
            grad_w = g.t() @ (rows if active is None else rows.index_select(0, active))
        if need_b and ctx.has_bias:
            grad_b = g.sum(dim=0)
        return grad_x, grad_w, grad_b
