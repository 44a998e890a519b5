"""accel/linear.py: the linear map whose backward skips rows without a gradient, against
plain autograd through F.linear."""

import pytest
import torch
import torch.nn.functional as F

from accel import linear as row_skipping


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
    out = row_skipping.linear(x, wl, b)  # features without a gradient, as region features
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
    monkeypatch.setattr(
        torch.Tensor, "index_select", lambda t, d, i: seen.append(len(i)) or original(t, d, i)
    )
    wl = w.clone().requires_grad_()
    torch.autograd.grad(row_skipping.linear(x, wl, b), [wl], grad)
    assert seen and set(seen) == {4}


def test_applies_to_float_cpu_tensors_outside_autocast():
    x = torch.randn(2, 3)
    assert row_skipping.applies(x) and row_skipping.applies(x.double())
    assert not row_skipping.applies(x.half())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not row_skipping.applies(x)


def test_a_row_without_gradient_adds_nothing_even_if_not_finite():
    """The documented difference from plain autograd: 0 x inf is not turned into NaN."""
    x, w, b, grad = data(seed=4)
    x[1, 2, 0] = float("inf")
    grad[1, 2] = 0
    wl = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(row_skipping.linear(x, wl, b), [wl], grad)
    keep = torch.ones(4, 3, dtype=torch.bool)
    keep[1, 2] = False
    torch.testing.assert_close(gw, grad[keep].t() @ x[keep], atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("precomp_enc_type", ["basic", "weight_norm"])
@pytest.mark.parametrize("bi_gru", [True, False])
def test_scan_encoders_in_float32_match_plain_autograd(precomp_enc_type, bi_gru, monkeypatch):
    """SCAN's encoders use row skipping in float32: with images and captions that get no
    gradient, every parameter gradient equals the one with row skipping off (plain autograd)."""
    from models import create_model

    torch.manual_seed(0)
    model = create_model(
        "scan",
        vocab_size=30,
        img_dim=12,
        embed_size=32,
        word_dim=6,
        precomp_enc_type=precomp_enc_type,
        bi_gru=bi_gru,
    )
    g = torch.Generator().manual_seed(1)
    images = torch.randn(6, 5, 12, generator=g)
    ids = torch.randint(0, 30, (6, 7), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 7, 2])
    img_weights = torch.randn(6, 5, 32, generator=g)
    cap_weights = torch.randn(6, 7, 32, generator=g)
    img_weights[[1, 4]] = 0
    cap_weights[[0, 2, 5]] = 0

    def gradients():
        model.zero_grad()
        img = model.encode_images(images)
        words = model.encode_captions(ids, lengths).words
        ((img * img_weights).sum() + (words * cap_weights[:, : words.shape[1]]).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    skipping = gradients()
    monkeypatch.setattr(row_skipping, "applies", lambda x: False)
    plain = gradients()
    for name in plain:
        torch.testing.assert_close(skipping[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_nonzero_rows_sees_tiny_negative_and_nan_entries():
    g = torch.zeros(6, 4)
    g[0, 1], g[1, 3], g[2, 0], g[4, 2] = 1e-45, -1e-45, float("nan"), -0.0
    g[5] = torch.tensor([3.0, -2.0, 0.0, 1.0])
    assert row_skipping.nonzero_rows(g).tolist() == [True, True, True, False, False, True]


def test_active_rows_does_not_trust_the_first_entry_alone():
    g = torch.randn(5, 4)
    assert row_skipping.active_rows(g) is None  # dense: every row has a gradient
    g[:, 0] = 0  # first entries zero, rows still active
    assert row_skipping.active_rows(g) is None
    g[[1, 3]] = 0
    assert row_skipping.active_rows(g).tolist() == [0, 2, 4]
    assert row_skipping.active_rows(torch.zeros(3, 2)).tolist() == []
