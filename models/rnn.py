"""Single-layer GRUs over padded batches with lengths, as the encoders use them.

`run_gru` is `nn.GRU` on the packed batch (real tokens only), padded back. On the CPU the
accelerated recurrence of accel/gru.py runs instead (same parameters, same results up to float
rounding); on CUDA the module itself runs (cuDNN).
"""

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from accel import gru as fast_gru


def run_gru(rnn, x, lengths=None, directions="concat", token_map=None):
    """Run the single-layer, batch-first `rnn` (nn.GRU, uni- or bidirectional) on x (B, T, I).

    lengths (B,) int (CPU preferred): real steps of each row, 1 <= L <= T; None = all T.
    Returns (out (B, T_max, dirs * H), zero at t >= L, where T_max = max(lengths); h_n (dirs, B, H),
    the state after each row's last real step (for the reverse direction, after step 0)), exactly
    what `nn.GRU` returns for the packed batch (after pad_packed_sequence).

    Two options work on the real tokens before they are padded (fewer rows, no padded copy):
    directions="mean" (bidirectional): out is (B, T_max, H), the average (fwd + bwd) / 2 of the
    two directions, as SCAN's encoders take it; token_map: a row-wise function applied to the
    real tokens' output vectors (tokens, F) -> (tokens, F'), e.g. an l2norm. Padding stays zero.
    """
    if directions not in ("concat", "mean"):
        raise ValueError(f"directions must be 'concat' or 'mean', got {directions!r}")
    if directions == "mean" and not rnn.bidirectional:
        raise ValueError("directions='mean' needs a bidirectional GRU")
    if rnn.num_layers != 1 or not rnn.batch_first or rnn.mode != "GRU" or not rnn.bias:
        raise ValueError("run_gru supports single-layer, batch-first nn.GRU modules with biases only")
    batch, steps = x.shape[:2]
    lengths = (
        torch.full((batch,), steps, dtype=torch.long)
        if lengths is None
        else torch.as_tensor(lengths, dtype=torch.long).cpu()
    )
    if lengths.shape != (batch,):
        raise ValueError(f"lengths {tuple(lengths.shape)} do not match a batch of {batch} rows")

    def combine(forward, backward):
        """The real tokens' output rows: both directions side by side, or their average."""
        if backward is None:
            out = forward
        elif directions == "mean":
            out = (forward + backward) / 2
        else:
            out = torch.cat([forward, backward], dim=1)
        return out if token_map is None else token_map(out)

    if batch == 0:  # the options still decide the feature size
        none = x.new_zeros(0, rnn.hidden_size)
        features = combine(none, none if rnn.bidirectional else None).shape[1]
        return x.new_zeros(0, 0, features), x.new_zeros(2 if rnn.bidirectional else 1, 0, rnn.hidden_size)
    if int(lengths.max()) > steps or int(lengths.min()) < 1:
        raise ValueError(f"lengths must lie in [1, {steps}]")
    if fast_gru.applies(x):
        return fast_gru.run_gru(rnn, x, lengths, combine)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, h_n = rnn(packed)
    hidden = rnn.hidden_size
    tokens = combine(out.data[:, :hidden], out.data[:, hidden:] if rnn.bidirectional else None)
    out = PackedSequence(tokens, out.batch_sizes, out.sorted_indices, out.unsorted_indices)
    return pad_packed_sequence(out, batch_first=True)[0], h_n
