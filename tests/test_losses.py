"""Tests of models/losses.py against an independent, loop-based float64 reference of the AOQ losses."""

import math

import pytest
import torch

from models.losses import LossConfig, OfflineScores, retrieval_loss
from models.variants import VARIANTS

DT = torch.float64


def relu(x):
    return x if x > 0.0 else 0.0


def reference(S, off, variant, m_on=0.2, m_off=0.0, alpha=0.3, beta=1.5, max_violation=True):
    """Plain-Python loss; S a list of lists, off a dict of lists. Returns dict of term sums."""
    B = len(S)
    pos = [S[b][b] for b in range(B)]
    online = 0.0
    if not max_violation:
        for i in range(B):
            for j in range(B):
                if i != j:
                    online += relu(m_on + S[i][j] - S[i][i]) + relu(m_on + S[i][j] - S[j][j])
        return {"online": online}
    terms = {"online": 0.0}
    if variant != "baseline":
        terms["offline_triplet"] = 0.0
    if variant in ("offquin", "adapoffquin"):
        terms["quintuplet"] = 0.0
    for b in range(B):
        on_t = max(S[b][j] for j in range(B) if j != b)
        on_i = max(S[i][b] for i in range(B) if i != b)
        h_t, h_i = relu(m_on + on_t - pos[b]), relu(m_on + on_i - pos[b])
        if variant == "adapoffquin":
            h_t *= beta - (off["off_t"][b] - on_t) / alpha
            h_i *= beta - (off["off_i"][b] - on_i) / alpha
        terms["online"] += h_t + h_i
        if "offline_triplet" in terms:
            terms["offline_triplet"] += relu(m_off + off["off_t"][b] - pos[b]) + relu(
                m_off + off["off_i"][b] - pos[b]
            )
        if "quintuplet" in terms:
            terms["quintuplet"] += relu(m_off + off["quin_a"][b] - pos[b]) + relu(
                m_off + off["quin_b"][b] - pos[b]
            )
    return terms


def random_case(B, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(B, B, generator=g, dtype=DT) * 2 - 1
    off = {k: torch.rand(B, generator=g, dtype=DT) * 2 - 1 for k in ("off_t", "off_i", "quin_a", "quin_b")}
    return S, off


def run(S, off, **cfg):
    offline = OfflineScores(**off) if off is not None else None
    return retrieval_loss(S, offline, LossConfig(**cfg))


def close(a, b, rel=1e-10):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


CUSTOM = dict(margin_online=0.35, margin_offline=0.1, alpha=0.5, beta=2.0)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("B", [2, 5, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("custom", [False, True])
def test_matches_reference(variant, B, seed, custom):
    S, off = random_case(B, seed)
    kw = CUSTOM if custom else {}
    loss, terms = run(S, off, variant=variant, **kw)
    ref_kw = (
        dict(m_on=kw["margin_online"], m_off=kw["margin_offline"], alpha=kw["alpha"], beta=kw["beta"])
        if custom
        else {}
    )
    ref = reference(S.tolist(), {k: v.tolist() for k, v in off.items()}, variant, **ref_kw)
    assert loss.dtype == DT and loss.dim() == 0
    assert close(loss.item(), sum(ref.values())), (loss.item(), ref)
    assert set(terms) == set(ref)
    for name, value in terms.items():
        assert not value.requires_grad
        assert close(value.item(), ref[name]), (name, value.item(), ref[name])
    assert close(sum(v.item() for v in terms.values()), loss.item())


@pytest.mark.parametrize("B", [2, 5, 16])
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("m_on", [0.2, 0.45])
def test_vse0_sum_all_matches_reference(B, seed, m_on):
    S, _ = random_case(B, seed)
    loss, terms = run(S, None, variant="baseline", max_violation=False, margin_online=m_on)
    ref = reference(S.tolist(), None, "baseline", m_on=m_on, max_violation=False)["online"]
    assert close(loss.item(), ref) and close(terms["online"].item(), ref)
    if B > 2:  # summing all negatives must differ from the hardest-negative loss
        assert not close(loss.item(), run(S, None, variant="baseline", margin_online=m_on)[0].item())


# Hand-computed B=2 case. S = [[0.5, 0.4], [0.6, 0.7]]: pos = (0.5, 0.7),
# on_t = (S01, S10) = (0.4, 0.6), on_i = (S10, S01) = (0.6, 0.4).
# h_t = ([0.2+0.4-0.5], [0.2+0.6-0.7]) = (0.1, 0.1); h_i = ([0.2+0.6-0.5], [0.2+0.4-0.7]) = (0.3, 0)
# baseline = 0.5.  off_t = (0.55, 0.2) -> o_t = (0.05, 0); off_i = (0.45, 0.9) -> o_i = (0, 0.2)
# quin_a = (0.6, 0.1) -> (0.1, 0); quin_b = (0.3, 0.75) -> (0, 0.05)
# offtri = 0.5 + 0.25 = 0.75; offquin = 0.75 + 0.15 = 0.9
# w_t = 1.5 - ((0.15, -0.4))/0.3 = (1.0, 17/6); w_i = 1.5 - ((-0.15, 0.5))/0.3 = (2.0, -1/6)
# adaptive online = 1.0*0.1 + 17/6*0.1 + 2.0*0.3 + (-1/6)*0 = 59/60; adapoffquin = 59/60 + 0.4 = 83/60
# VSE0 (B=2): [0.2+0.4-0.5] + [0.2+0.4-0.7] + [0.2+0.6-0.7] + [0.2+0.6-0.5] = 0.1+0+0.1+0.3 = 0.5
HAND_S = [[0.5, 0.4], [0.6, 0.7]]
HAND_OFF = dict(off_t=[0.55, 0.2], off_i=[0.45, 0.9], quin_a=[0.6, 0.1], quin_b=[0.3, 0.75])
HAND_EXPECTED = {"baseline": 0.5, "offtri": 0.75, "offquin": 0.9, "adapoffquin": 83 / 60}


def hand_tensors(**override):
    off = {k: torch.tensor(override.get(k, v), dtype=DT, requires_grad=True) for k, v in HAND_OFF.items()}
    return torch.tensor(HAND_S, dtype=DT, requires_grad=True), off


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hand_computed_b2(variant):
    S, off = hand_tensors()
    loss, terms = run(S, off, variant=variant)
    assert close(loss.item(), HAND_EXPECTED[variant])
    assert close(terms["online"].item(), 59 / 60 if variant == "adapoffquin" else 0.5)
    assert close(run(S, off, variant="baseline", max_violation=False)[0].item(), 0.5)


def test_negative_weight_is_not_clamped():
    # off_t[0] = 0.95: off_t - on_t = 0.55 > alpha*beta = 0.45, so w_t[0] = 1.5 - 0.55/0.3 = -1/3.
    # online = -1/3*0.1 + 17/6*0.1 + 2.0*0.3 = 51/60 (a clamp at 0 would give 53/60).
    S, off = hand_tensors(off_t=[0.95, 0.2])
    loss, terms = run(S, off, variant="adapoffquin")
    assert close(terms["online"].item(), 51 / 60)
    # offline triplet now o_t = (0.45, 0), o_i = (0, 0.2); quintuplet unchanged 0.15
    assert close(loss.item(), 51 / 60 + 0.65 + 0.15)


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_through_adaptive_weights(detach):
    # d loss/d off_t[b] = -h_t[b]/alpha * (not detach) + 1[o_t[b] > 0]; same for off_i.
    # h_t = (0.1, 0.1), o_t = (0.05, 0) -> (-1/3 + 1, -1/3); h_i = (0.3, 0), o_i = (0, 0.2) -> (-1, 1)
    S, off = hand_tensors()
    loss, _ = run(S, off, variant="adapoffquin", detach_weights=detach)
    loss.backward()
    if detach:
        exp_t, exp_i = [1.0, 0.0], [0.0, 1.0]
    else:
        exp_t, exp_i = [2 / 3, -1 / 3], [-1.0, 1.0]
    assert torch.allclose(off["off_t"].grad, torch.tensor(exp_t, dtype=DT), rtol=1e-12, atol=1e-12)
    assert torch.allclose(off["off_i"].grad, torch.tensor(exp_i, dtype=DT), rtol=1e-12, atol=1e-12)
    # quintuplet hinges: active only at quin_a[0], quin_b[1]
    assert off["quin_a"].grad.tolist() == [1.0, 0.0] and off["quin_b"].grad.tolist() == [0.0, 1.0]
    # d loss/d S[0,1] (on_t[0] and on_i[1]; h_i[1] = 0): w_t[0] + h_t[0]/alpha (if not detached) = 1 + 1/3
    assert close(S.grad[0, 1].item(), 1.0 + (0.0 if detach else 0.1 / 0.3))


def away_from_kinks(S, off, m_on=0.2, m_off=0.0, tol=1e-3):
    B = S.shape[0]
    for b in range(B):
        for vec in (S[b], S[:, b]):
            neg = sorted((vec[j].item() for j in range(B) if j != b), reverse=True)
            if len(neg) > 1 and neg[0] - neg[1] < tol:
                return False
            if abs(m_on + neg[0] - S[b, b].item()) < tol:
                return False
        if any(abs(m_off + v[b].item() - S[b, b].item()) < tol for v in off.values()):
            return False
    return True


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_full_loss(variant):
    # default detach_weights=False only: a stop-gradient is deliberately not the true derivative
    seed = next(s for s in range(100) if away_from_kinks(*random_case(6, s)))
    S, off = random_case(6, seed)
    keys = list(off)

    def f(S_, *vals):
        return run(S_, dict(zip(keys, vals)), variant=variant)[0]

    inputs = [S.requires_grad_()] + [off[k].requires_grad_() for k in keys]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("variant", ["offtri", "offquin", "adapoffquin"])
def test_missing_offline_scores_raise(variant):
    S, _ = random_case(4, 0)
    with pytest.raises(ValueError):
        run(S, None, variant=variant)


def test_invalid_configs_raise():
    S, off = random_case(4, 0)
    with pytest.raises(ValueError):
        run(S, off, variant="nope")
    with pytest.raises(ValueError):
        run(S, off, variant="adapoffquin", max_violation=False)


def reference_algebra(S, off, variant, m_on=0.2, m_off=0.0, alpha=0.3, beta=1.5):
    """The reference's own tensor algebra (modelAOQ.ContrastiveLoss), transcribed: hinge matrices
    with the diagonal masked to 0 then the row/column max; the weights' online scores from
    S - 10 I; the positives as the diagonal. The ablation variants drop terms."""
    B = S.shape[0]
    eye = torch.eye(B, dtype=S.dtype)
    pos = S.diagonal()
    cost_s = (m_on + S - pos[:, None]).clamp(min=0).masked_fill(eye.bool(), 0).max(1).values
    cost_im = (m_on + S - pos[None, :]).clamp(min=0).masked_fill(eye.bool(), 0).max(0).values
    if variant == "adapoffquin":
        shifted = S - 10 * eye
        cost_s = cost_s * (beta - (off["off_t"] - shifted.max(1).values) / alpha)
        cost_im = cost_im * (beta - (off["off_i"] - shifted.max(0).values) / alpha)
    total = cost_s.sum() + cost_im.sum()
    if variant != "baseline":
        total = total + sum((m_off + off[k] - pos).clamp(min=0).sum() for k in ("off_t", "off_i"))
    if variant in ("offquin", "adapoffquin"):
        total = total + sum((m_off + off[k] - pos).clamp(min=0).sum() for k in ("quin_a", "quin_b"))
    return total


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("B", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_batch_size_matches_the_reference_value_and_gradient(variant, B, seed):
    """A short last batch (B = 1 or 2) must train like the reference: finite, same value, same
    gradient. The -inf diagonal once made AdapOffQuin's weight -inf and the loss NaN at B = 1."""
    S, off = random_case(B, seed)
    if seed == 3:  # the audit's example: every score 1 against offline scores 0
        S, off = torch.ones(B, B, dtype=DT), {k: torch.zeros(B, dtype=DT) for k in off}
    ours_in = [S.clone().requires_grad_()] + [off[k].clone().requires_grad_() for k in off]
    ref_in = [S.clone().requires_grad_()] + [off[k].clone().requires_grad_() for k in off]
    loss, _ = run(ours_in[0], dict(zip(off, ours_in[1:])), variant=variant)
    expected = reference_algebra(ref_in[0], dict(zip(off, ref_in[1:])), variant)
    loss.backward()
    expected.backward()
    assert torch.isfinite(loss) and close(loss.item(), expected.item()), (loss.item(), expected.item())
    for ours, ref in zip(ours_in, ref_in):
        ref_grad = torch.zeros_like(ref) if ref.grad is None else ref.grad
        our_grad = torch.zeros_like(ours) if ours.grad is None else ours.grad
        assert torch.allclose(our_grad, ref_grad, rtol=1e-12, atol=1e-12), (our_grad, ref_grad)


def test_batch_of_one_hand_computed():
    # B = 1, S = [[1]], offline scores 0: no in-batch negative, so both online hinges are 0; the
    # reference's weight is 1.5 - (0 - (1 - 10)) / 0.3 = -28.5, times 0. Offline hinges
    # [0 + 0 - 1]_+ = 0. The loss is 0, finite, with zero gradient.
    S = torch.ones(1, 1, dtype=DT, requires_grad=True)
    off = {k: torch.zeros(1, dtype=DT) for k in HAND_OFF}
    loss, terms = run(S, off, variant="adapoffquin")
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in terms.values())
    assert S.grad.tolist() == [[0.0]]
