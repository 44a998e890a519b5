"""The GRU recurrence on the CPU over a packed batch, with a backward whose weight gradients are
single matrix products (models/rnn.py calls it; it computes what `nn.GRU` computes).

On the CPU, `nn.GRU`'s backward forms the recurrent weight gradient one time step at a time (a
(3H x B) by (B x H) product and a 3H x H accumulation per step), and with packed input it also
writes a full-size input gradient per step. Here, on the packed layout (real tokens only, time
major, rows sorted by length), the input projection is one product over all tokens, the
recurrence keeps what its backward needs, and the backward collects the per-step gate gradients
so that dW_hh = sum_t dgh_t^T h_(t-1) is one product too.

In float32 the elementwise cell of each step (gates, candidate, new state; in the backward, the
gate gradients) is one pass of a compiled kernel (gru_cell.c) instead of a dozen torch ops;
without a C compiler, or in other dtypes, the same steps run as torch ops.

The parameters stay those of the `nn.GRU` module (state dicts are unchanged).
"""

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

import accel
from accel import build
from accel import linear as row_skipping

CELL_SOURCE = Path(__file__).with_name("gru_cell.c")


def applies(x):
    """Whether `run_gru` runs for input x: on the CPU, with the accelerated paths on. (On CUDA,
    cuDNN's fused kernels are faster than anything here.)"""
    return accel.enabled() and x.device.type == "cpu"


def run_gru(rnn, x, lengths, combine):
    """models/rnn.py's `run_gru` on the CPU: `rnn` a single-layer batch-first nn.GRU, x (B, T, I)
    with B >= 1, lengths (B,) CPU int64 in [1, T] (checked by the caller); combine(forward rows,
    backward rows or None) -> output rows of the real tokens. Returns (out, h_n) as nn.GRU."""
    batch, steps = x.shape[:2]
    # The packed layout, built here: pack_padded_sequence and pad_packed_sequence copy one time
    # step at a time, forward and backward, which cost as much as the recurrence's elementwise
    # work; index_select / index_copy move all tokens at once (and backpropagate as one
    # index_add / index_select).
    order = torch.argsort(lengths, descending=True, stable=True)  # sorted row b -> row
    longest = int(lengths[order[0]])
    batch_sizes = (lengths[order][None, :] > torch.arange(longest)[:, None]).sum(1)
    layout = _Layout(batch_sizes, x.device)
    device_order = order.to(x.device)
    data = x.reshape(batch * steps, -1).index_select(0, device_order[layout.row] * steps + layout.step)
    suffixes = ["", "_reverse"] if rnn.bidirectional else [""]
    recurrence_inputs = []
    for suffix in suffixes:
        inputs = data if not suffix else data.index_select(0, layout.reversal)
        # (tokens, 3H): one product; its backward skips the tokens of rows without a gradient
        project = row_skipping.linear if row_skipping.applies(inputs) else F.linear
        gates_in = project(inputs, getattr(rnn, "weight_ih_l0" + suffix), getattr(rnn, "bias_ih_l0" + suffix))
        recurrence_inputs += [
            gates_in,
            getattr(rnn, "weight_hh_l0" + suffix),
            getattr(rnn, "bias_hh_l0" + suffix),
        ]
    outs, finals = [], []
    outputs = _Recurrences.apply(layout, torch.is_grad_enabled(), *recurrence_inputs)  # (tokens, H) each
    for suffix, out in zip(suffixes, outputs):
        finals.append(out.index_select(0, layout.last))  # (B, H), sorted rows
        outs.append(out if not suffix else out.index_select(0, layout.reversal))
    out = combine(outs[0], outs[1] if len(outs) > 1 else None)
    padded = (
        out.new_zeros(batch * longest, out.shape[1])
        .index_copy(0, device_order[layout.row] * longest + layout.step, out)
        .view(batch, longest, -1)
    )
    h_n = torch.stack(finals)[:, torch.argsort(device_order)]
    return padded, h_n


class _Layout:
    """Index maps of a packed batch: token (t, b) of sorted row b sits at offsets[t] + b."""

    def __init__(self, batch_sizes, device):
        self.batch_sizes = batch_sizes.tolist()
        sizes = batch_sizes.to(torch.long)
        self.offsets = [0] + torch.cumsum(sizes, 0).tolist()
        starts = torch.tensor(self.offsets[:-1], dtype=torch.long)
        step = torch.repeat_interleave(torch.arange(len(sizes)), sizes)  # t of each token
        row = torch.arange(self.offsets[-1]) - starts[step]  # b of each token
        self.step, self.row = step.to(device), row.to(device)
        length = (sizes[None, :] > torch.arange(int(sizes[0]))[:, None]).sum(1)  # L of sorted row b
        self.lengths, self.starts, self.device = length, starts, device
        # token (t, b) of the time-reversed row is token (L_b - 1 - t, b) of the row
        self.reversal = (starts[length[row] - 1 - step] + row).to(device)
        self.last = (starts[length - 1] + torch.arange(len(length))).to(device)
        # h_(t-1) of every token with t >= 1
        self.previous = (starts[step[sizes[0] :] - 1] + row[sizes[0] :]).to(device)

    def subset(self, rows):
        """(layout of the sorted rows `rows` (ascending CPU int64), or None if there are none;
        the index of each of its tokens in this layout)."""
        if len(rows) == 0:
            return None, torch.zeros(0, dtype=torch.long, device=self.device)
        lengths = self.lengths[rows]  # still in decreasing order
        sub = _Layout((lengths[None, :] > torch.arange(int(lengths[0]))[:, None]).sum(1), self.device)
        step, row = sub.step.cpu(), sub.row.cpu()
        return sub, (self.starts[step] + rows[row]).to(self.device)


class _Recurrences(torch.autograd.Function):
    """For each direction d: h_t = GRU cell(gates_in_d[t], h_(t-1)) on a packed layout, h_(-1) = 0.

    apply(layout, gates_in, w_hh, b_hh[, gates_in_rev, w_hh_rev, b_hh_rev]) -> one (tokens, H)
    output per direction. gates_in (tokens, 3H) = W_ih x + b_ih, gate order (r, z, n) as nn.GRU.
    Runs in the promoted dtype of gates_in and the weights, outside autocast; gradients come back
    in the inputs' dtypes. (Running the two directions in two threads, one core each, was
    measured no faster within a training step; they run one after the other.)
    """

    @staticmethod
    def forward(ctx, layout, grad_enabled, *inputs):
        groups = [inputs[i : i + 3] for i in range(0, len(inputs), 3)]
        # what the backward needs is kept only if there will be one (inside forward, grad mode
        # is always off, and needs_input_grad ignores the caller's no_grad)
        keep = grad_enabled and any(ctx.needs_input_grad)
        with torch.autocast(inputs[0].device.type, enabled=False):
            results = [_forward_direction(*g, layout, keep) for g in groups]
        ctx.save_for_backward(*[t for g, (out, saved, w) in zip(groups, results) for t in (w, out, saved)])
        ctx.layout = layout
        ctx.dtypes = [tuple(t.dtype for t in g) for g in groups]
        return tuple(out for out, _, _ in results)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        saved, layout, tokens = ctx.saved_tensors, ctx.layout, None
        # A row (caption) whose outputs get no gradient in any direction has none anywhere (the
        # state gradient flows within a row): the backward runs on the other rows only.
        active = _active_rows(grad_outs, layout)
        if active is not None:
            layout, tokens = layout.subset(active)
        jobs = []
        for d, grad in enumerate(grad_outs):
            w, out, kept = saved[3 * d : 3 * d + 3]
            if tokens is not None:
                grad, out, kept = (
                    grad.index_select(0, tokens),
                    out.index_select(0, tokens),
                    kept.index_select(1, tokens),
                )
            jobs.append((grad, w, out, kept, layout))
        with torch.autocast(grad_outs[0].device.type, enabled=False):
            results = [
                _backward_direction(*job) if layout is not None else _no_gradient(*job) for job in jobs
            ]
        grads = []
        for (grad_gi, grad_w, grad_b), (gi_dtype, w_dtype, b_dtype) in zip(results, ctx.dtypes):
            if tokens is not None:  # rows without a gradient get zeros
                grad_gi = grad_gi.new_zeros(ctx.layout.offsets[-1], grad_gi.shape[1]).index_copy_(
                    0, tokens, grad_gi
                )
            grads += [grad_gi.to(gi_dtype), grad_w.to(w_dtype), grad_b.to(b_dtype)]
        return (None, None, *grads)


def _active_rows(grad_outs, layout):
    """Sorted rows (CPU int64) with a nonzero output gradient in some direction, or None when
    (almost) all have one and the backward runs on every row."""
    if bool(grad_outs[0][:, 0].ne(0).all()):  # the usual dense case, found cheaply
        return None
    token_active = row_skipping.nonzero_rows(grad_outs[0])
    for grad in grad_outs[1:]:
        token_active |= row_skipping.nonzero_rows(grad)
    counts = torch.zeros(len(layout.lengths), dtype=torch.long, device=token_active.device)
    rows = counts.index_add_(0, layout.row, token_active.long()).gt(0).nonzero().squeeze(1).cpu()
    return None if len(rows) > row_skipping.DENSE_ABOVE * len(layout.lengths) else rows


def _no_gradient(grad, w, out, kept, layout):
    """The backward's results when no row has a gradient: zeros."""
    return grad.new_zeros(0, w.shape[0]), torch.zeros_like(w), w.new_zeros(w.shape[0])


def _forward_direction(gates_in, w_hh, b_hh, layout, keep):
    """-> (out (tokens, H), what the backward needs (4, tokens or 0, H), w in the compute dtype)."""
    dtype = torch.promote_types(gates_in.dtype, w_hh.dtype)
    gi, w, b = gates_in.to(dtype).contiguous(), w_hh.to(dtype), b_hh.to(dtype)
    lib = _kernels_for(gi)
    out, saved = (_forward_native if lib is not None else _forward_torch)(lib, gi, w, b, layout, keep)
    return out, saved, w


def _backward_direction(grad_out, w, out, saved, layout):
    """-> (grad gates_in, grad W_hh, grad b_hh) in the compute dtype."""
    grad_out = grad_out.to(w.dtype).contiguous()
    lib = _kernels_for(out)
    grad_gi, grad_gh = (_backward_native if lib is not None else _backward_torch)(
        lib, grad_out, w, out, saved, layout
    )
    # dW_hh = sum over tokens with t >= 1 of dgh^T h_(t-1): one product (h_(-1) = 0)
    grad_w = grad_gh[layout.batch_sizes[0] :].t() @ out[layout.previous]
    return grad_gi, grad_w, grad_gh.sum(dim=0)


def _bind_cell_kernels(lib):
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.aoq_gru_cell_forward.restype = None
    lib.aoq_gru_cell_forward.argtypes = [p, i64, p, p, p, p, p, p, p, i64, i64]
    lib.aoq_gru_cell_backward.restype = None
    lib.aoq_gru_cell_backward.argtypes = [p, p, p, p, p, p, p, p, p, p, i64, i64]
    return lib


def cell_kernels():
    """The bound kernels of gru_cell.c, or None (switched off, or no C compiler works here)."""
    if not accel.enabled():
        return None
    return build.load_library(CELL_SOURCE, "aoq_gru_cell", _bind_cell_kernels)


def _kernels_for(x):
    """The compiled cell kernels when they apply to `x` (float32 on the CPU), else None."""
    return cell_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None


def _forward_torch(lib, gi, w, b, layout, keep):
    """The recurrence as torch ops; returns (out (tokens, H), saved (4, tokens or 0, H))."""
    hidden = w.shape[1]
    out = gi.new_empty(gi.shape[0], hidden)
    saved = gi.new_empty(4, gi.shape[0] if keep else 0, hidden)  # r, z, n, W_hn h + b_hn
    h = gi.new_zeros(layout.batch_sizes[0], hidden)
    w_t = w.t()
    for start, n in zip(layout.offsets, layout.batch_sizes):
        h = h[:n]
        gh = torch.addmm(b, h, w_t)  # (n, 3H)
        g = gi[start : start + n]
        rz = torch.sigmoid(g[:, : 2 * hidden] + gh[:, : 2 * hidden])
        r, z = rz[:, :hidden], rz[:, hidden:]
        cand = torch.tanh(torch.addcmul(g[:, 2 * hidden :], r, gh[:, 2 * hidden :]))
        h = torch.addcmul(cand, z, h - cand)  # (1 - z) n + z h
        out[start : start + n] = h
        if keep:
            for k, value in enumerate((r, z, cand, gh[:, 2 * hidden :])):
                saved[k, start : start + n] = value
    return out, saved


def _forward_native(lib, gi, w, b, layout, keep):
    """The recurrence with one kernel call per step after its W_hh product."""
    hidden = w.shape[1]
    tokens, first = gi.shape[0], layout.batch_sizes[0]
    out = gi.new_empty(tokens, hidden)
    saved = gi.new_empty(4, tokens if keep else 0, hidden)
    zeros = gi.new_zeros(first, hidden)
    gh = gi.new_empty(first, 3 * hidden)
    w_t = w.t()  # (a contiguous copy makes the products ~7% faster but costs more than it saves)
    size = gi.element_size()
    gi_p, out_p, zeros_p = gi.data_ptr(), out.data_ptr(), zeros.data_ptr()
    saved_p = [saved[k].data_ptr() for k in range(4)] if keep else None
    previous = None
    for start, n in zip(layout.offsets, layout.batch_sizes):
        if previous is None:
            gh[:n] = b  # h_(-1) = 0
            prev_p = zeros_p
        else:
            torch.addmm(b, out[previous : previous + n], w_t, out=gh[:n])
            prev_p = out_p + previous * hidden * size
        rows = start * hidden * size
        lib.aoq_gru_cell_forward(
            gi_p + start * 3 * hidden * size,
            3 * hidden,
            gh.data_ptr(),
            prev_p,
            out_p + rows,
            *([p + rows for p in saved_p] if keep else [None] * 4),
            n,
            hidden,
        )
        previous = start
    return out, saved


def _backward_torch(lib, grad_out, w, out, saved, layout):
    """Per-step gate gradients as torch ops; returns (grad_gi, grad_gh), each (tokens, 3H)."""
    hidden = w.shape[1]
    grad_gi = out.new_empty(out.shape[0], 3 * hidden)
    grad_gh = out.new_empty(out.shape[0], 3 * hidden)
    dh = out.new_zeros(layout.batch_sizes[0], hidden)
    for t in range(len(layout.batch_sizes) - 1, -1, -1):
        start, n = layout.offsets[t], layout.batch_sizes[t]
        rows = slice(start, start + n)
        r, z, cand, ghn = saved[0, rows], saved[1, rows], saved[2, rows], saved[3, rows]
        h_prev = out[layout.offsets[t - 1] : layout.offsets[t - 1] + n] if t else torch.zeros_like(cand)
        d = dh[:n] + grad_out[rows]
        d_cand = d * (1 - z) * (1 - cand * cand)  # through tanh
        grad_gi[rows, :hidden] = d_cand * ghn * r * (1 - r)
        grad_gi[rows, hidden : 2 * hidden] = d * (h_prev - cand) * z * (1 - z)
        grad_gi[rows, 2 * hidden :] = d_cand
        grad_gh[rows, : 2 * hidden] = grad_gi[rows, : 2 * hidden]
        grad_gh[rows, 2 * hidden :] = d_cand * r
        if t:  # h_(-1) = 0 is a constant
            dh[:n] = torch.addmm(d * z, grad_gh[rows], w)  # (n, H)
    return grad_gi, grad_gh


def _backward_native(lib, grad_out, w, out, saved, layout):
    """The same with one kernel call per step before its W_hh product."""
    hidden, tokens, first = w.shape[1], out.shape[0], layout.batch_sizes[0]
    grad_gi = out.new_empty(tokens, 3 * hidden)
    grad_gh = out.new_empty(tokens, 3 * hidden)
    # dh ping-pongs between two buffers; rows past a step's batch are never written, so stay 0
    dh, dh_next = out.new_zeros(first, hidden), out.new_zeros(first, hidden)
    dz, zeros = out.new_empty(first, hidden), out.new_zeros(first, hidden)
    size = out.element_size()
    go_p, out_p = grad_out.data_ptr(), out.data_ptr()
    saved_p = [saved[k].data_ptr() for k in range(4)]
    gi_p, gh_p = grad_gi.data_ptr(), grad_gh.data_ptr()
    for t in range(len(layout.batch_sizes) - 1, -1, -1):
        start, n = layout.offsets[t], layout.batch_sizes[t]
        rows = start * hidden * size
        prev_p = out_p + layout.offsets[t - 1] * hidden * size if t else zeros.data_ptr()
        lib.aoq_gru_cell_backward(
            dh.data_ptr(),
            go_p + rows,
            *[p + rows for p in saved_p],
            prev_p,
            gi_p + 3 * rows,
            gh_p + 3 * rows,
            dz.data_ptr(),
            n,
            hidden,
        )
        if t:  # h_(-1) = 0 is a constant
            torch.addmm(dz[:n], grad_gh[start : start + n], w, out=dh_next[:n])
            dh, dh_next = dh_next, dh
    return grad_gi, grad_gh
