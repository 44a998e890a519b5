"""Optimiser layout and clipping, including the reference's doubled captioning update (Q-DUP)."""

import math

import pytest
import torch
from torch import nn

from pipeline_steps.training.optim import Optimizers, ReleaseAdam, clip_grad_norm_listed


class TwoPart(nn.Module):
    def __init__(self, double=True):
        super().__init__()
        self.retrieval = nn.Linear(3, 2)
        self.caption = nn.Linear(2, 2)
        self.double = double

    def parameter_groups(self):
        return {"retrieval": list(self.retrieval.parameters()), "caption": list(self.caption.parameters())}

    def adam_steps(self):
        return {"caption": 2} if self.double else {}

    def loss(self, x):
        return (self.caption(torch.tanh(self.retrieval(x))) ** 2).sum()


def adam_reference(param, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """Textbook Adam, one update per gradient in `grads`, on a float64 copy."""
    p, m, v = param.double().clone(), torch.zeros_like(param, dtype=torch.float64), 0
    v = torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


def test_clip_counting_each_param_once_equals_torch():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    (a(x) ** 2).sum().mul(10).backward()
    (b(x) ** 2).sum().mul(10).backward()
    ours = clip_grad_norm_listed([(list(a.parameters()), 1)], 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert ours == pytest.approx(float(theirs), rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("max_norm", [0.01, 1e6])
def test_clip_with_duplicated_params_follows_the_listed_semantics(max_norm):
    torch.manual_seed(1)
    model = TwoPart()
    model.loss(torch.randn(6, 3)).backward()
    grads = {p: p.grad.clone() for p in model.parameters()}
    listed = list(model.retrieval.parameters()) + 2 * list(model.caption.parameters())
    # Reference semantics of clipping a list that names the caption params twice.
    total = math.sqrt(sum(float((grads[p] ** 2).sum()) for p in listed))
    coef = max_norm / (total + 1e-6)
    for p in listed:
        if coef < 1:
            grads[p] = grads[p] * coef
    got = clip_grad_norm_listed(
        [(list(model.retrieval.parameters()), 1), (list(model.caption.parameters()), 2)], max_norm
    )
    assert got == pytest.approx(total)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, grads[p])


@pytest.mark.parametrize("double", [True, False])
def test_caption_parameters_get_two_adam_steps_in_parity_mode(double):
    torch.manual_seed(2)
    model = TwoPart(double)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optim = Optimizers(model, lr=0.01)
    x = torch.randn(6, 3)
    history = {name: [] for name in start}
    for _ in range(3):
        optim.zero_grad()
        model.loss(x).backward()
        for name, p in model.named_parameters():
            history[name].append(p.grad.clone())
        optim.step()
    for name, p in model.named_parameters():
        repeats = 2 if double and name.startswith("caption") else 1
        grads = [g for g in history[name] for _ in range(repeats)]
        torch.testing.assert_close(p.detach().double(), adam_reference(start[name], grads, 0.01))


def test_state_round_trip_and_layout_check():
    model = TwoPart()
    optim = Optimizers(model, lr=0.01)
    model.loss(torch.randn(2, 3)).backward()
    optim.step()
    other = Optimizers(model, lr=0.01)
    other.load_state_dict(optim.state_dict())
    assert other.state_dict()[1]["state"][0]["step"] == 2  # two caption steps per iteration
    with pytest.raises(ValueError):
        Optimizers(TwoPart(double=False), lr=0.01).load_state_dict(optim.state_dict())


def adam_041_loop(values, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """PyTorch 0.4.1's Adam, written out element by element in Python floats (docs/method.md):
    eps is added to sqrt(v) before v's bias correction, which goes into the step size."""
    p, m, v = list(values), [0.0] * len(values), [0.0] * len(values)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            p[i] -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m[i] / (math.sqrt(v[i]) + eps)
    return p


def test_release_adam_follows_the_041_rule_step_by_step():
    """float64, gradients of very different sizes (1e-9 to 1): after each of 6 steps every
    element equals the element-wise loop; a parameter without a gradient is skipped and keeps
    its own step count."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    start = {"a": a.detach().tolist(), "b": b.detach().tolist()}
    scale = torch.logspace(-9, 0, 7, dtype=torch.float64)
    optim = ReleaseAdam([a, b], lr=0.01)
    seen = {"a": [], "b": []}
    for step in range(6):
        a.grad = torch.randn(7, dtype=torch.float64, generator=g) * scale
        b.grad = None if step in (1, 4) else torch.randn(3, dtype=torch.float64, generator=g)
        for name, p in (("a", a), ("b", b)):
            if p.grad is not None:
                seen[name].append(p.grad.tolist())
        optim.step()
        for name, p in (("a", a), ("b", b)):
            expected = adam_041_loop(start[name], seen[name], 0.01)
            assert p.detach().tolist() == pytest.approx(expected, rel=1e-13, abs=1e-15)
    assert optim.state[b]["step"] == 4 and optim.state[a]["step"] == 6


def test_release_adam_differs_from_todays_adam_where_the_reference_said():
    """The two rules differ by eps -> eps / sqrt(1 - b2^t): for a gradient of the size of eps the
    first step moves the 0.4.1 parameter about sqrt(1 - b2) = 3% as far as today's Adam does."""
    p_old = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    p_new = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    old, new = ReleaseAdam([p_old], lr=1.0), torch.optim.Adam([p_new], lr=1.0)
    for p, optim in ((p_old, old), (p_new, new)):
        p.grad = torch.full((1,), 1e-10, dtype=torch.float64)
        optim.step()
    assert p_old.item() == pytest.approx(-math.sqrt(1e-3) * 1e-10 / (math.sqrt(1e-3) * 1e-10 + 1e-8))
    assert p_new.item() == pytest.approx(-1e-10 / (1e-10 + 1e-8))
    assert abs(p_old.item()) < abs(p_new.item()) / 10


def test_optimizers_with_the_release_rule_double_the_caption_steps():
    torch.manual_seed(4)
    model = TwoPart().to(torch.float64)
    start = {name: p.detach().flatten().tolist() for name, p in model.named_parameters()}
    optim = Optimizers(model, lr=0.01, release_adam=True)
    x = torch.randn(6, 3, dtype=torch.float64)
    history = {name: [] for name in start}
    for _ in range(3):
        optim.zero_grad()
        model.loss(x).backward()
        for name, p in model.named_parameters():
            history[name] += [p.grad.flatten().tolist()] * (2 if name.startswith("caption") else 1)
        optim.step()
    for name, p in model.named_parameters():
        expected = adam_041_loop(start[name], history[name], 0.01)
        assert p.detach().flatten().tolist() == pytest.approx(expected, rel=1e-12)


def test_release_adam_resumes_from_its_state_dict_exactly():
    """Stepped 4 times, or 2 times, saved, loaded into a fresh optimiser and stepped 2 more."""
    torch.manual_seed(5)
    x = torch.randn(6, 3)
    runs = []
    for split in (None, 2):
        torch.manual_seed(6)
        model = TwoPart()
        optim = Optimizers(model, lr=0.01, release_adam=True)
        for step in range(4):
            if step == split:
                state = optim.state_dict()
                optim = Optimizers(model, lr=0.01, release_adam=True)
                optim.load_state_dict(state)
            optim.zero_grad()
            model.loss(x).backward()
            optim.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
