"""run_gru (models/rnn.py; on the CPU, accel/gru.py) against nn.GRU on the packed batch: outputs,
final states, gradients."""

import contextlib
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import accel
from accel import gru
from models.rnn import run_gru


def packed_reference(rnn, x, lengths):
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, h_n = rnn(packed)
    return pad_packed_sequence(out, batch_first=True)[0], h_n


def make(bidirectional, seed=0, dtype=torch.float64, inp=5, hidden=7):
    torch.manual_seed(seed)
    return torch.nn.GRU(inp, hidden, batch_first=True, bidirectional=bidirectional).to(dtype)


LENGTHS = {
    "mixed": [3, 9, 1, 5, 5, 8],  # unsorted, ties, a one-step row
    "equal": [4, 4, 4],
    "single": [6],
}


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("case", sorted(LENGTHS))
def test_matches_packed_nn_gru_with_gradients(bidirectional, case):
    rnn = make(bidirectional)
    lengths = torch.tensor(LENGTHS[case])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(lengths), int(lengths.max()) + 2, 5, dtype=torch.float64, generator=g)
    x.requires_grad_()
    got, got_h = run_gru(rnn, x, lengths)
    want, want_h = packed_reference(rnn, x, lengths)
    assert got.shape == want.shape and got_h.shape == want_h.shape
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_h, want_h, atol=1e-12, rtol=1e-12)
    assert (got[torch.arange(got.shape[1])[None, :] >= lengths[:, None]] == 0).all()
    w_out, w_h = (
        torch.randn(got.shape, dtype=torch.float64, generator=g),
        torch.randn(got_h.shape, dtype=torch.float64, generator=g),
    )
    inputs = [x] + list(rnn.parameters())
    grads = torch.autograd.grad((got * w_out).sum() + (got_h * w_h).sum(), inputs)
    want_grads = torch.autograd.grad((want * w_out).sum() + (want_h * w_h).sum(), inputs)
    for name, a, b in zip(["x"] + [n for n, _ in rnn.named_parameters()], grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def test_full_length_rows_and_float32():
    rnn = make(False, dtype=torch.float32, inp=16, hidden=32)
    x = torch.randn(8, 36, 16)
    got, got_h = run_gru(rnn, x)  # no lengths: every row runs all steps
    want, want_h = rnn(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h, want_h, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(run_gru(rnn, x)[0], got.detach())


def test_autocast_keeps_the_recurrence_in_float32():
    rnn = make(True, dtype=torch.float32)
    x = torch.randn(4, 6, 5, requires_grad=True)
    lengths = torch.tensor([6, 2, 4, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_h = run_gru(rnn, x, lengths)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, packed_reference(rnn, x, lengths)[0], atol=5e-2, rtol=5e-2)
    got.sum().backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in rnn.parameters())


def test_rejects_what_it_does_not_cover():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="single-layer"):
        run_gru(torch.nn.GRU(5, 4, num_layers=2, batch_first=True), x)
    with pytest.raises(ValueError, match="single-layer"):
        run_gru(torch.nn.GRU(5, 4), x)
    with pytest.raises(ValueError, match="lengths"):
        run_gru(torch.nn.GRU(5, 4, batch_first=True), x, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="lengths"):
        run_gru(torch.nn.GRU(5, 4, batch_first=True), x, torch.tensor([0, 1]))


@pytest.fixture(params=["kernel", "torch"])
def cell_engine(request, monkeypatch):
    """Run the float32 recurrence through the compiled cell kernel, or through torch ops."""
    if request.param == "torch":
        monkeypatch.setattr(gru, "cell_kernels", lambda: None)
    elif gru.cell_kernels() is None:
        pytest.fail("the C compiler is part of the test environment: the cell kernel must build")
    return request.param


@pytest.mark.parametrize("hidden", [40, 64, 272])  # 64, 272: the kernels' streaming stores, 272 in two chunks
@pytest.mark.parametrize("bidirectional", [False, True])
def test_float32_paths_match_float64_nn_gru(cell_engine, bidirectional, hidden):
    rnn64 = make(bidirectional, seed=3, inp=6, hidden=hidden)
    rnn32 = make(bidirectional, seed=3, dtype=torch.float32, inp=6, hidden=hidden)
    lengths = torch.tensor([7, 2, 9, 9, 1, 4])
    g = torch.Generator().manual_seed(5)
    x64 = (3 * torch.randn(len(lengths), 9, 6, dtype=torch.float64, generator=g)).requires_grad_()
    x32 = x64.detach().float().requires_grad_()
    got, got_h = run_gru(rnn32, x32, lengths)
    want, want_h = packed_reference(rnn64, x64, lengths)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got_h.double(), want_h, atol=2e-6, rtol=1e-5)
    w_out = torch.randn(got.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((got.double() * w_out).sum(), [x32] + list(rnn32.parameters()))
    want_grads = torch.autograd.grad((want * w_out).sum(), [x64] + list(rnn64.parameters()))
    for name, a, b in zip(["x"] + [n for n, _ in rnn64.named_parameters()], grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=name)


def test_saturated_gates_stay_finite(cell_engine):
    """Pre-activations far beyond the exp range (the kernel clamps its exp) give 0/1 gates."""
    rnn = make(False, seed=0, dtype=torch.float32, inp=3, hidden=5)
    with torch.no_grad():
        rnn.weight_ih_l0.mul_(1e4)
    x = torch.randn(2, 4, 3, requires_grad=True)
    out, _ = run_gru(rnn, x, torch.tensor([4, 3]))
    want, _ = packed_reference(copy.deepcopy(rnn).double(), x.double(), torch.tensor([4, 3]))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lengths_must_match_the_batch_and_an_empty_batch_is_empty():
    rnn = make(True, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        run_gru(rnn, torch.randn(3, 5, 5), torch.tensor([5, 2]))
    out, h_n = run_gru(rnn, torch.randn(0, 5, 5), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0, 0, 14) and h_n.shape == (2, 0, 7)
    out, _ = run_gru(rnn, torch.randn(0, 5, 5), torch.zeros(0, dtype=torch.long), directions="mean")
    assert out.shape == (0, 0, 7)
    out, _ = run_gru(
        rnn, torch.randn(0, 5, 5), torch.zeros(0, dtype=torch.long), token_map=lambda r: r[:, :3]
    )
    assert out.shape == (0, 0, 3)
    with pytest.raises(ValueError, match="biases"):
        run_gru(torch.nn.GRU(5, 4, batch_first=True, bias=False), torch.randn(2, 3, 5))


def test_no_grad_keeps_nothing_for_a_backward(cell_engine, monkeypatch):
    from accel import gru

    kept = []
    original = gru._forward_direction
    monkeypatch.setattr(gru, "_forward_direction", lambda *args: kept.append(args[-1]) or original(*args))
    rnn = make(True, dtype=torch.float32)
    with torch.no_grad():
        run_gru(rnn, torch.randn(3, 4, 5), torch.tensor([4, 1, 3]))
    run_gru(rnn, torch.randn(3, 4, 5), torch.tensor([4, 1, 3]))
    assert kept == [False, False, True, True]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize(
    "zero_rows, final_rows", [([1, 3], []), ([0, 2, 3, 5], [2]), ([0, 1, 2, 3, 4, 5], [])]
)
def test_rows_without_a_gradient_are_left_out_of_the_backward(
    cell_engine, bidirectional, zero_rows, final_rows, monkeypatch
):
    """Rows whose outputs get no gradient (an inactive hinge) are skipped; every gradient equals
    nn.GRU's in float64. A row with a gradient on its final state only still runs."""
    from accel import gru

    tokens_run = []
    original = gru._backward_direction
    monkeypatch.setattr(
        gru, "_backward_direction", lambda grad, *rest: tokens_run.append(len(grad)) or original(grad, *rest)
    )
    rnn64 = make(bidirectional, seed=4, inp=6, hidden=32)  # 32: the kernels' streaming stores too
    rnn32 = make(bidirectional, seed=4, dtype=torch.float32, inp=6, hidden=32)
    lengths = torch.tensor([7, 2, 9, 9, 1, 4])
    g = torch.Generator().manual_seed(6)
    x64 = torch.randn(len(lengths), 9, 6, dtype=torch.float64, generator=g).requires_grad_()
    x32 = x64.detach().float().requires_grad_()
    w_out = torch.randn(
        len(lengths), 9, rnn64.hidden_size * (2 if bidirectional else 1), dtype=torch.float64, generator=g
    )
    w_out[zero_rows] = 0
    w_h = torch.zeros(2 if bidirectional else 1, len(lengths), rnn64.hidden_size, dtype=torch.float64)
    w_h[:, final_rows] = torch.randn(w_h[:, final_rows].shape, dtype=torch.float64, generator=g)
    for rnn, x, tol in ((rnn32, x32, dict(atol=2e-5, rtol=1e-4)), (rnn64, x64, dict(atol=1e-12, rtol=1e-10))):
        got, got_h = run_gru(rnn, x, lengths)
        grads = torch.autograd.grad(
            (got.double() * w_out).sum() + (got_h.double() * w_h).sum(), [x] + list(rnn.parameters())
        )
        want, want_h = packed_reference(rnn64, x64, lengths)
        want_grads = torch.autograd.grad(
            (want * w_out).sum() + (want_h * w_h).sum(), [x64] + list(rnn64.parameters())
        )
        for name, a, b in zip(["x"] + [n for n, _ in rnn64.named_parameters()], grads, want_grads):
            torch.testing.assert_close(a.double(), b, msg=name, **tol)
    active = sorted(set(range(len(lengths))) - set(zero_rows) | set(final_rows))
    run = int(lengths[active].sum()) if active else None
    assert tokens_run == ([run] * 2 * (2 if bidirectional else 1) if run else [])


@pytest.mark.parametrize("engine", ["packed layout", "module"])  # module: the plain path (GPUs, AOQ_NO_ACCEL)
@pytest.mark.parametrize("directions, bidirectional", [("mean", True), ("concat", True), ("concat", False)])
def test_direction_mean_and_token_map_act_on_real_tokens(engine, directions, bidirectional):
    """directions='mean' and token_map equal post-processing nn.GRU's padded output (average of
    the halves, then the map per position), padding stays zero; gradients too. The module engine
    is the path GPUs take."""
    rnn = make(bidirectional, seed=8)
    lengths = torch.tensor([3, 6, 1, 6])
    x = torch.randn(
        4, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True
    )
    token_map = lambda rows: rows / (rows.norm(dim=-1, keepdim=True) + 1e-8) * 2.0  # zero rows stay zero
    with accel.disabled() if engine == "module" else contextlib.nullcontext():
        assert gru.applies(x) == (engine == "packed layout")
        got, got_h = run_gru(rnn, x, lengths, directions=directions, token_map=token_map)
    want, want_h = packed_reference(rnn, x, lengths)
    if directions == "mean":
        want = (want[..., :7] + want[..., 7:]) / 2
    want = token_map(want)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_h, want_h, atol=1e-12, rtol=1e-12)
    weights = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((got * weights).sum(), [x] + list(rnn.parameters()))
    want_grads = torch.autograd.grad((want * weights).sum(), [x] + list(rnn.parameters()))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_direction_options_are_checked():
    with pytest.raises(ValueError, match="directions"):
        run_gru(make(True), torch.randn(2, 3, 5, dtype=torch.float64), directions="sum")
    with pytest.raises(ValueError, match="bidirectional"):
        run_gru(make(False), torch.randn(2, 3, 5, dtype=torch.float64), directions="mean")
