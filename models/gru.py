"""Single-layer GRUs over padded batches with lengths: the function of `nn.GRU` on the packed batch,
with a CPU backward whose weight gradients are single matrix products.

On the CPU, `nn.GRU`'s backward forms the recurrent weight gradient one time step at a time (a
(3H x B) by (B x H) product and a 3H x H accumulation per step), and with packed input it also
writes a full-size input gradient per step. Here, on the packed layout (real tokens only, time
major, rows sorted by length), the input projection is one product over all tokens, the
recurrence keeps what its backward needs, and the backward collects the per-step gate gradients
so that dW_hh = sum_t dgh_t^T h_(t-1) is one product too.

The parameters stay those of the `nn.GRU` module (state dicts are unchanged). On CUDA the module
itself runs (cuDNN's fused kernels); the results are the same up to float rounding.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def run_gru(rnn, x, lengths=None):
    """Run the single-layer, batch-first `rnn` (nn.GRU, uni- or bidirectional) on x (B, T, I).

    lengths (B,) int (CPU preferred): real steps of each row, 1 <= L <= T; None = all T.
    Returns (out (B, T_max, dirs * H), zero at t >= L, where T_max = max(lengths); h_n (dirs, B, H),
    the state after each row's last real step (for the reverse direction, after step 0)), exactly
    what `nn.GRU` returns for the packed batch (after pad_packed_sequence).
    """
    if rnn.num_layers != 1 or not rnn.batch_first or rnn.mode != "GRU":
        raise ValueError("run_gru supports single-layer, batch-first nn.GRU modules only")
    batch, steps = x.shape[:2]
    lengths = torch.full((batch,), steps, dtype=torch.long) if lengths is None else \
        torch.as_tensor(lengths, dtype=torch.long).cpu()
    if batch and (int(lengths.max()) > steps or int(lengths.min()) < 1):
        raise ValueError(f"lengths must lie in [1, {steps}]")
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    if x.is_cuda:
        out, h_n = rnn(packed)
        return pad_packed_sequence(out, batch_first=True)[0], h_n
    layout = _Layout(packed.batch_sizes, x.device)
    outs, finals = [], []
    for suffix in (["", "_reverse"] if rnn.bidirectional else [""]):
        reverse = layout.reversal if suffix else None
        inputs = packed.data if reverse is None else packed.data[reverse]
        gates_in = F.linear(inputs, getattr(rnn, "weight_ih_l0" + suffix),
                            getattr(rnn, "bias_ih_l0" + suffix))          # (tokens, 3H): one product
        out = _Recurrence.apply(gates_in, getattr(rnn, "weight_hh_l0" + suffix),
                                getattr(rnn, "bias_hh_l0" + suffix), layout)  # (tokens, H)
        finals.append(out[layout.last])                                   # (B, H), sorted rows
        outs.append(out if reverse is None else out[reverse])
    out = PackedSequence(torch.cat(outs, dim=1), packed.batch_sizes, packed.sorted_indices,
                         packed.unsorted_indices)
    h_n = torch.stack(finals)[:, packed.unsorted_indices]
    return pad_packed_sequence(out, batch_first=True)[0], h_n


class _Layout:
    """Index maps of a packed batch: token (t, b) of sorted row b sits at offsets[t] + b."""

    def __init__(self, batch_sizes, device):
        self.batch_sizes = batch_sizes.tolist()
        sizes = batch_sizes.to(torch.long)
        self.offsets = [0] + torch.cumsum(sizes, 0).tolist()
        starts = torch.tensor(self.offsets[:-1])
        step = torch.repeat_interleave(torch.arange(len(sizes)), sizes)   # t of each token
        row = torch.arange(self.offsets[-1]) - starts[step]               # b of each token
        length = (sizes[None, :] > torch.arange(int(sizes[0]))[:, None]).sum(1)  # L of sorted row b
        # token (t, b) of the time-reversed row is token (L_b - 1 - t, b) of the row
        self.reversal = (starts[length[row] - 1 - step] + row).to(device)
        self.last = (starts[length - 1] + torch.arange(len(length))).to(device)
        # h_(t-1) of every token with t >= 1
        self.previous = (starts[step[sizes[0]:] - 1] + row[sizes[0]:]).to(device)


class _Recurrence(torch.autograd.Function):
    """h_t = GRU cell(gates_in[t], h_(t-1)) on a packed layout, h_(-1) = 0.

    gates_in (tokens, 3H) = W_ih x + b_ih, gate order (r, z, n) as nn.GRU. Runs in the promoted
    dtype of gates_in and the weights, outside autocast; gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, gates_in, w_hh, b_hh, layout):
        dtype = torch.promote_types(gates_in.dtype, w_hh.dtype)
        with torch.autocast(gates_in.device.type, enabled=False):
            gi, w, b = gates_in.to(dtype), w_hh.to(dtype), b_hh.to(dtype)
            hidden = w.shape[1]
            out = gi.new_empty(gi.shape[0], hidden)
            keep = any(ctx.needs_input_grad)                               # False under no_grad
            saved = gi.new_empty(4, gi.shape[0] if keep else 0, hidden)   # r, z, n, W_hn h + b_hn
            h = gi.new_zeros(layout.batch_sizes[0], hidden)
            w_t = w.t()
            for start, n in zip(layout.offsets, layout.batch_sizes):
                h = h[:n]
                gh = torch.addmm(b, h, w_t)                                # (n, 3H)
                g = gi[start:start + n]
                rz = torch.sigmoid(g[:, :2 * hidden] + gh[:, :2 * hidden])
                r, z = rz[:, :hidden], rz[:, hidden:]
                cand = torch.tanh(torch.addcmul(g[:, 2 * hidden:], r, gh[:, 2 * hidden:]))
                h = torch.addcmul(cand, z, h - cand)                       # (1 - z) n + z h
                out[start:start + n] = h
                if keep:
                    for k, value in enumerate((r, z, cand, gh[:, 2 * hidden:])):
                        saved[k, start:start + n] = value
        ctx.save_for_backward(w, out, saved)
        ctx.layout, ctx.dtypes = layout, (gates_in.dtype, w_hh.dtype, b_hh.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        w, out, saved = ctx.saved_tensors
        layout = ctx.layout
        with torch.autocast(grad_out.device.type, enabled=False):
            grad_out = grad_out.to(w.dtype)
            hidden = w.shape[1]
            grad_gi = out.new_empty(out.shape[0], 3 * hidden)
            grad_gh = out.new_empty(out.shape[0], 3 * hidden)
            dh = out.new_zeros(layout.batch_sizes[0], hidden)
            for t in range(len(layout.batch_sizes) - 1, -1, -1):
                start, n = layout.offsets[t], layout.batch_sizes[t]
                rows = slice(start, start + n)
                r, z, cand, ghn = saved[0, rows], saved[1, rows], saved[2, rows], saved[3, rows]
                h_prev = out[layout.offsets[t - 1]:layout.offsets[t - 1] + n] if t else torch.zeros_like(cand)
                d = dh[:n] + grad_out[rows]
                d_cand = d * (1 - z) * (1 - cand * cand)                   # through tanh
                grad_gi[rows, :hidden] = d_cand * ghn * r * (1 - r)
                grad_gi[rows, hidden:2 * hidden] = d * (h_prev - cand) * z * (1 - z)
                grad_gi[rows, 2 * hidden:] = d_cand
                grad_gh[rows, :2 * hidden] = grad_gi[rows, :2 * hidden]
                grad_gh[rows, 2 * hidden:] = d_cand * r
                dh[:n] = torch.addmm(d * z, grad_gh[rows], w)              # (n, H)
            # dW_hh = sum over tokens with t >= 1 of dgh^T h_(t-1): one product (h_(-1) = 0)
            first = layout.batch_sizes[0]
            grad_w = grad_gh[first:].t() @ out[layout.previous]
            grad_b = grad_gh.sum(dim=0)
        gi_dtype, w_dtype, b_dtype = ctx.dtypes
        return grad_gi.to(gi_dtype), grad_w.to(w_dtype), grad_b.to(b_dtype), None
