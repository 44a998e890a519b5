"""Optimiser layout and clipping, including the reference's doubled captioning update (Q-DUP)."""

import math

import pytest
import torch
from torch import nn

from pipeline_steps.training.optim import Optimizers, clip_grad_norm_listed


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
