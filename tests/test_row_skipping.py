"""models/row_skipping.py: the linear map whose backward skips rows without a gradient, against
plain autograd through F.linear."""
import pytest
import torch
import torch.nn.functional as F

from models import row_skipping


def data(seed=0, dtype=torch.float64, shape=(4, 3)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 5, dtype=dtype, generator=g)
    w = torch.randn(6, 5, dtype=dtype, generator=g)
    b = torch.randn(6, dtype=dtype, generator=g)
    grad = torch.randn(*shape, 6, dtype=dtype, generator=g)
    return x, w, b, grad


@pytest.mark.parametrize("zero_rows", ["none", "some", "most", "all"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_equal_plain_autograd(zero_rows, with_bias):
    x, w, b, grad = data()
    flat = grad.view(-1, 6)
    chosen = {"none": [], "some": [1, 4, 5, 11], "most": list(range(11)), "all": list(range(12))}[zero_rows]
    flat[chosen] = 0
    b = b if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w, *([b] if with_bias else []))]
    plain = [t.clone().requires_grad_() for t in leaves]
    got = row_skipping.linear(*leaves, *([] if with_bias else [None]))
    want = F.linear(*plain, *([] if with_bias else [None]))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    got_grads = torch.autograd.grad(got, leaves, grad)
    want_grads = torch.autograd.grad(want, plain, grad)
    for a, c in zip(got_grads, want_grads):
        torch.testing.assert_close(a, c, atol=1e-13, rtol=1e-13)


def test_only_what_needs_a_gradient_is_computed():
    x, w, b, grad = data(seed=1)
    grad.view(-1, 6)[[0, 2]] = 0
    wl = w.clone().requires_grad_()
    out = row_skipping.linear(x, wl, b)           # features without a gradient, as region features
    (gw,) = torch.autograd.grad(out, [wl], grad)
    torch.testing.assert_close(gw, torch.einsum("...o,...i->oi", grad, x), atol=1e-13, rtol=1e-13)


def test_without_a_gradient_it_is_plain_linear():
    x, w, b, _ = data(seed=2)
    assert row_skipping.linear(x, w, b).grad_fn is None
    with torch.no_grad():
        assert row_skipping.linear(x, w.requires_grad_(), b).grad_fn is None


def test_the_skipping_path_gathers_only_active_rows(monkeypatch):
    """With half the rows inactive, the weight gradient's product sees the active rows only."""
    x, w, b, grad = data(seed=3, dtype=torch.float32, shape=(8,))
    grad[1::2] = 0
    seen = []
    original = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, d, i: seen.append(len(i)) or original(t, d, i))
    wl = w.clone().requires_grad_()
    torch.autograd.grad(row_skipping.linear(x, wl, b), [wl], grad)
    assert seen and set(seen) == {4}


def test_applies_to_float32_cpu_outside_autocast():
    x = torch.randn(2, 3)
    assert row_skipping.applies(x)
    assert not row_skipping.applies(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not row_skipping.applies(x)


def test_nonzero_rows_sees_tiny_negative_and_nan_entries():
    g = torch.zeros(6, 4)
    g[0, 1], g[1, 3], g[2, 0], g[4, 2] = 1e-45, -1e-45, float("nan"), -0.0
    g[5] = torch.tensor([3.0, -2.0, 0.0, 1.0])
    assert row_skipping.nonzero_rows(g).tolist() == [True, True, True, False, False, True]


def test_active_rows_does_not_trust_the_first_entry_alone():
    g = torch.randn(5, 4)
    assert row_skipping.active_rows(g) is None              # dense: every row has a gradient
    g[:, 0] = 0                                              # first entries zero, rows still active
    assert row_skipping.active_rows(g) is None
    g[[1, 3]] = 0
    assert row_skipping.active_rows(g).tolist() == [0, 2, 4]
    assert row_skipping.active_rows(torch.zeros(3, 2)).tolist() == []
