"""Optimisers and gradient clipping, including the reference's doubled captioning update (Q-DUP).

VSRN/AOQ list every captioning parameter twice in one Adam param group (docs/reference_behaviours.md). Under
PyTorch 0.4.1 that meant: the clip norm counts their gradients twice, clipping scales them by
coef**2, and Adam updates them twice per iteration with the same gradient. Modern PyTorch does not
reproduce that reliably from a duplicated list, so the parity mode does it explicitly: a second
Adam over the captioning parameters, stepped twice. Without parity every parameter is listed once.

The releases ran PyTorch 0.4.1 (VSE++, SCAN: older still), whose Adam adds eps to sqrt(v) before
the bias correction of v; today's adds it after. `ReleaseAdam` steps by that older rule
(Q-ADAM041 in docs/reference_behaviours.md, default `train.release_adam: true`).
"""

import math

import torch


class ReleaseAdam(torch.optim.Optimizer):
    """Adam as PyTorch 0.4.1 stepped it (docs/reference_behaviours.md, Q-ADAM041). Per parameter
    and step t (counted per parameter; a parameter without a gradient is skipped, as there):

        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

    Today's torch.optim.Adam divides by sqrt(v) / sqrt(1 - b2^t) + eps instead: the same update
    with eps replaced by eps / sqrt(1 - b2^t), so early steps here damp small-gradient parameters
    more. Parameters at the same step are updated together with the _foreach kernels.
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            at_step = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                at_step.setdefault(state["step"], []).append(p)
            for t, params in at_step.items():
                grads = [p.grad for p in params]
                exp_avg = [self.state[p]["exp_avg"] for p in params]
                exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
                torch._foreach_mul_(exp_avg, beta1)
                torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
                torch._foreach_mul_(exp_avg_sq, beta2)
                torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
                denom = torch._foreach_sqrt(exp_avg_sq)
                torch._foreach_add_(denom, group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
                torch._foreach_addcdiv_(params, exp_avg, denom, value=-step_size)


def adam(params, lr, release=False):
    """ReleaseAdam (release=True), or torch's Adam with its fused kernel (one pass per parameter
    instead of a dozen ops; the same update up to float rounding): 43 ms against 9 ms for SCAN's
    13M parameters on 2 cores."""
    params = list(params)
    if release:
        return ReleaseAdam(params, lr)
    fused = all(
        p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


class Optimizers:
    """One or more Adam optimisers, each stepped `repeats` times per iteration: one over every
    parameter, unless the model asks for more steps for some of its groups (`adam_steps`)."""

    def __init__(self, model, lr, release_adam=False):
        groups = model.parameter_groups()
        repeated = {name: n for name, n in model.adam_steps().items() if n > 1 and groups.get(name)}
        if repeated:
            single = [p for name, ps in groups.items() if name not in repeated for p in ps]
            self.parts = [(adam(single, lr, release_adam), 1)] + [
                (adam(groups[name], lr, release_adam), n) for name, n in repeated.items()
            ]
        else:
            self.parts = [(adam(model.parameters(), lr, release_adam), 1)]

    def set_lr(self, lr):
        for optimizer, _ in self.parts:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def zero_grad(self):
        for optimizer, _ in self.parts:
            optimizer.zero_grad(set_to_none=True)

    def clip(self, max_norm):
        """Total-norm clipping as the reference: parameters count as often as they are listed."""
        listed = [
            (group["params"], repeats)
            for optimizer, repeats in self.parts
            for group in optimizer.param_groups
        ]
        return clip_grad_norm_listed(listed, max_norm)

    def step(self):
        for optimizer, repeats in self.parts:
            for _ in range(repeats):
                optimizer.step()

    def state_dict(self):
        return [optimizer.state_dict() for optimizer, _ in self.parts]

    def load_state_dict(self, states):
        if len(states) != len(self.parts):
            raise ValueError("optimiser state does not match the optimiser layout")
        for (optimizer, _), state in zip(self.parts, states):
            optimizer.load_state_dict(state)


@torch.no_grad()
def clip_grad_norm_listed(listed, max_norm):
    """Clip gradients of `listed` = [(params, times)] as a list naming each param `times` times.

    total = sqrt(sum times * ||g||^2); coef = max_norm / (total + 1e-6); if coef < 1 every
    gradient is multiplied by coef once per listing (coef**times). Returns the total norm.
    """
    squares = [
        times * float(p.grad.pow(2).sum()) for params, times in listed for p in params if p.grad is not None
    ]
    total = math.sqrt(sum(squares))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for params, times in listed:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef**times)
    return total
