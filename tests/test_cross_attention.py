"""Batched SCAN / BFAN kernels against a slow per-pair loop that follows the reference step by step
(docs/models.md): each caption is sliced to its true length and
every pair is scored with plain 2-D tensor operations, so no masking is involved."""

import math
import zlib

import pytest
import torch

from models import attention as xa

K, D = 5, 8


# ---- slow reference -------------------------------------------------------------------------
def leaky(x):
    return torch.where(x > 0, x, 0.1 * x)


def first_norm(a, norm):
    """a (s, m) = C Q^T; normalise each context row across the query axis (dim 1)."""
    if norm == "softmax":
        return torch.softmax(a, dim=1)
    if norm in ("clipped_l2norm", "clipped_leaky_l2norm", "clipped", "clipped_l1norm"):
        a = leaky(a)
    if norm == "relu_l2norm":
        a = torch.clamp(a, min=0)
    if norm.endswith("l2norm"):
        return a / (torch.sqrt((a**2).sum(dim=1, keepdim=True)) + 1e-8)
    if norm.endswith("l1norm"):
        return a / (a.abs().sum(dim=1, keepdim=True) + 1e-8)
    return a


def ref_attention(q, c, lam, norm, focal=None):
    """Attended vectors (m, d) of queries q (m, d) over context c (s, d), and the fallback count."""
    attn = first_norm(c @ q.t(), norm)  # (s, m)
    alpha = torch.softmax(lam * attn.t(), dim=1)  # (m, s), softmax over the context
    fallbacks = 0
    if focal is not None:
        g = torch.ones_like(alpha) if focal == "equal" else torch.sqrt(alpha)
        # F[q, r] = sum_t (alpha_qr - alpha_qt) g_qt, materialised as an (m, s, s) tensor
        f = ((alpha[:, :, None] - alpha[:, None, :]) * g[:, None, :]).sum(dim=2)
        h = (f > 0).to(alpha.dtype)
        rows = []
        for qi in range(alpha.shape[0]):
            if h[qi].sum() == 0:
                rows.append(alpha[qi])
                fallbacks += 1
            else:
                rows.append(h[qi] * alpha[qi] / (h[qi] * alpha[qi]).sum())
        alpha = torch.stack(rows)
    return alpha @ c, fallbacks


def ref_cos(x, y):
    return (x * y).sum(dim=1) / torch.clamp(x.norm(dim=1) * y.norm(dim=1), min=1e-8)


def ref_agg(r, agg, lam2):
    if agg == "LogSumExp":
        return torch.log(torch.exp(lam2 * r).sum()) / lam2
    return {"Mean": r.mean, "Max": r.max, "Sum": r.sum}[agg]()


def ref_sims(img, words, lengths, direction, norm, lam1):
    """Per pair (i, j): the vector R of cosines between each query and its attended vector."""
    sims = {}
    for i in range(len(img)):
        for j in range(len(words)):
            v, w = img[i], words[j, : int(lengths[j])]
            if direction == "t2i":
                a, _ = ref_attention(w, v, lam1, norm)
                sims[i, j] = ref_cos(w, a)
            else:
                a, _ = ref_attention(v, w, lam1, norm)
                sims[i, j] = ref_cos(v, a)
    return sims


def ref_scan(sims, shape, agg, lam2):
    out = torch.zeros(shape, dtype=torch.float64)
    for (i, j), r in sims.items():
        out[i, j] = ref_agg(r, agg, lam2)
    return out


def ref_bfan(img, words, lengths, focal, lam):
    out, total = torch.zeros(len(img), len(words), dtype=img.dtype), 0
    for i in range(len(img)):
        for j in range(len(words)):
            v, w = img[i], words[j, : int(lengths[j])]
            a_t2i, f1 = ref_attention(w, v, lam, "clipped_l2norm", focal)
            a_i2t, f2 = ref_attention(v, w, lam, "clipped_l2norm", focal)
            out[i, j] = ref_cos(w, a_t2i).mean() + ref_cos(v, a_i2t).mean()
            total += f1 + f2
    return out, total


# ---- data -----------------------------------------------------------------------------------
def make_data(n_img=3, n_cap=5, seed=0, dtype=torch.float64, normalise=True, pad_value=None):
    """Images (n_img, K, D); words (n_cap, L, D) with lengths incl. 1 and 2 and padding filled with
    random garbage (or `pad_value`), two columns wider than the longest caption."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, K, D, generator=g, dtype=dtype)
    lengths = torch.randint(1, 7, (n_cap,), generator=g)
    lengths[0], lengths[1] = 1, 2
    words = torch.randn(n_cap, int(lengths.max()) + 2, D, generator=g, dtype=dtype)
    if normalise:
        img, words = img / img.norm(dim=-1, keepdim=True), words / words.norm(dim=-1, keepdim=True)
    if pad_value is not None:
        words[torch.arange(words.shape[1])[None, :] >= lengths[:, None]] = pad_value
    return img, words, lengths


# ---- SCAN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", xa.RAW_FEATURE_NORMS)
@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_scan_all_pairs_match_per_pair_loop(direction, norm):
    img, words, lengths = make_data(seed=zlib.crc32(f"{direction}{norm}".encode()) % 1000)
    sims = ref_sims(img, words, lengths, direction, norm, 9.0)
    for agg in xa.AGG_FUNCS:
        got = xa.scan_scores(
            img,
            words,
            lengths,
            direction=direction,
            raw_feature_norm=norm,
            agg_func=agg,
            lambda_softmax=9.0,
            lambda_lse=6.0,
            chunk=2,
        )
        assert got.shape == (3, 5) and got.dtype == torch.float64
        torch.testing.assert_close(got, ref_scan(sims, (3, 5), agg, 6.0), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("lam1,lam2", [(4.0, 5.0), (4.0, 20.0), (9.0, 6.0), (0.5, 1.0)])
@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_scan_lambdas_and_unnormalised_features(direction, lam1, lam2):
    img, words, lengths = make_data(seed=7, normalise=False)
    sims = ref_sims(img, words, lengths, direction, "clipped_l2norm", lam1)
    for agg in ("LogSumExp", "Mean"):
        got = xa.scan_scores(
            img, words, lengths, direction=direction, agg_func=agg, lambda_softmax=lam1, lambda_lse=lam2
        )
        torch.testing.assert_close(got, ref_scan(sims, (3, 5), agg, lam2), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_scan_float32_matches_float64_reference(direction):
    img, words, lengths = make_data(n_img=4, n_cap=6, seed=3)
    got = xa.scan_scores(img.float(), words.float(), lengths, direction=direction, lambda_lse=20.0)
    want = ref_scan(
        ref_sims(img, words, lengths, direction, "clipped_l2norm", 9.0), (4, 6), "LogSumExp", 20.0
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["t2i", "i2t", "equal", "prob"])
def test_paired_is_the_diagonal_and_chunking_changes_nothing(kernel):
    img, words, lengths = make_data(n_img=5, n_cap=5, seed=11)

    def score(**kw):
        if kernel in xa.DIRECTIONS:
            return xa.scan_scores(
                img, words, lengths, direction=kernel, raw_feature_norm="softmax", agg_func="Mean", **kw
            )
        return xa.bfan_scores(img, words, lengths, focal_type=kernel, **kw)

    full = score(chunk=100)
    for chunk in (1, 2, 3, None):
        torch.testing.assert_close(score(chunk=chunk), full, atol=1e-12, rtol=0)
    paired = score(paired=True)
    assert paired.shape == (5,)
    torch.testing.assert_close(paired, full.diagonal(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel", ["t2i", "i2t", "equal", "prob"])
def test_padding_values_and_width_change_nothing(kernel):
    img, noisy, lengths = make_data(seed=5)
    _, zero, _ = make_data(seed=5, pad_value=0.0)
    wide = torch.cat([noisy, torch.full((5, 3, D), 7.0, dtype=noisy.dtype)], dim=1)

    def score(words, paired):
        n = len(img) if paired else len(words)
        words, lens = words[:n], lengths[:n]
        if kernel in xa.DIRECTIONS:
            return xa.scan_scores(
                img, words, lens, direction=kernel, raw_feature_norm="l2norm", paired=paired
            )
        return xa.bfan_scores(img, words, lens, focal_type=kernel, paired=paired)

    for paired in (False, True):
        base = score(zero, paired)
        for words in (noisy, wide):
            torch.testing.assert_close(score(words, paired), base, atol=1e-12, rtol=0)


@pytest.mark.parametrize("norm", xa.RAW_FEATURE_NORMS)
@pytest.mark.parametrize("direction", xa.DIRECTIONS)
def test_gradients_are_finite_with_padding(direction, norm):
    img, words, lengths = make_data(seed=2, pad_value=0.0)
    img.requires_grad_(True)
    words.requires_grad_(True)
    xa.scan_scores(img, words, lengths, direction=direction, raw_feature_norm=norm).sum().backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(words.grad).all()
    pad = torch.arange(words.shape[1])[None, :] >= lengths[:, None]
    assert (words.grad[pad] == 0).all()


SCAN_VARIANTS = [
    {},
    {"raw_feature_norm": "softmax", "agg_func": "Mean"},
    {"raw_feature_norm": "l1norm", "agg_func": "Max"},
    {"raw_feature_norm": "no_norm", "agg_func": "Sum"},
]


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("kernel", ["t2i", "i2t", "equal", "prob"])
def test_zero_padding_skips_the_mask_with_the_same_gradients(kernel, paired, sparse_grad):
    """Zero padding (the encoders' output) is used as is, garbage padding is masked first: both
    must give the same scores and gradients at the real words, and none at the padded ones."""
    img, noisy, lengths = make_data(n_img=5, n_cap=5, seed=9)
    _, zero, _ = make_data(n_img=5, n_cap=5, seed=9, pad_value=0.0)
    pad = torch.arange(noisy.shape[1])[None, :] >= lengths[:, None]
    b, pos = pad.nonzero()[0].tolist()
    noisy[b, pos, 0] = float("inf")  # garbage that only masking makes harmless
    assert noisy[pad].abs().min() > 0

    def run(words):
        im, w = img.clone().requires_grad_(), words.clone().requires_grad_()
        options = dict(paired=paired, chunk=2, sparse_grad=sparse_grad)
        if kernel in xa.DIRECTIONS:
            scores = [
                xa.scan_scores(im, w, lengths, direction=kernel, **options, **variant)
                for variant in SCAN_VARIANTS
            ]
        else:
            scores = [xa.bfan_scores(im, w, lengths, focal_type=kernel, **options)]
        # a few entries get a gradient, as with a hardest-negative loss
        weights = torch.zeros_like(scores[0]).flatten()
        weights[::3] = torch.linspace(0.5, 2.0, len(weights[::3]), dtype=weights.dtype)
        sum((s.flatten() * weights).sum() for s in scores).backward()
        return torch.stack([s.detach() for s in scores]), im.grad, w.grad

    want, got = run(noisy), run(zero)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert (got[2][pad] == 0).all()


# ---- BFAN -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [20.0, 5.0])
@pytest.mark.parametrize("focal", xa.FOCAL_TYPES)
def test_bfan_matches_per_pair_loop(focal, lam):
    img, words, lengths = make_data(n_img=4, n_cap=6, seed=13)
    got, fallbacks = xa.bfan_scores(
        img, words, lengths, focal_type=focal, lambda_softmax=lam, chunk=4, return_fallbacks=True
    )
    want, ref_fallbacks = ref_bfan(img, words, lengths, focal, lam)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert int(fallbacks) == ref_fallbacks


@pytest.mark.parametrize("focal", xa.FOCAL_TYPES)
def test_bfan_guard_for_one_token_captions(focal):
    # A 1-token caption in the i2t direction: alpha = 1 for every region, every F = 0, so the
    # reference divides 0/0. The guard keeps alpha: a_i = the word itself.
    img, words, lengths = make_data(n_img=3, n_cap=5, seed=17, pad_value=0.0)
    img.requires_grad_(True)
    scores, fallbacks = xa.bfan_scores(img, words, lengths, focal_type=focal, return_fallbacks=True)
    assert torch.isfinite(scores).all()
    n_one = int((lengths == 1).sum())
    assert int(fallbacks) >= 3 * K * n_one > 0
    want, ref_fallbacks = ref_bfan(img.detach(), words, lengths, focal, 20.0)
    torch.testing.assert_close(scores.detach(), want, atol=1e-10, rtol=1e-10)
    assert int(fallbacks) == ref_fallbacks
    # i2t part of a 1-token pair: mean_i cos(v_i, w_0), computed directly
    i2t = ref_cos(img[0].detach(), words[0, :1].expand(K, D)).mean()
    attended, _ = ref_attention(words[0, :1], img[0].detach(), 20.0, "clipped_l2norm", focal)
    direct = ref_cos(words[0, :1], attended).mean() + i2t
    torch.testing.assert_close(scores[0, 0].detach(), direct, atol=1e-10, rtol=0)
    scores.sum().backward()
    assert torch.isfinite(img.grad).all()


def test_focal_mask_is_strict_and_carries_no_gradient():
    alpha = torch.tensor(
        [[0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64, requires_grad=True
    )
    out, fallback = xa.focal_reassign(alpha, "equal")
    assert fallback.tolist() == [True, False]  # all equal: nothing strictly above the mean
    torch.testing.assert_close(out[1].detach(), torch.tensor([0.4, 0.3, 0, 0], dtype=torch.float64) / 0.7)
    out[1, 0].backward()
    # d/d alpha of alpha_0 / (alpha_0 + alpha_1): only the kept entries receive gradient
    torch.testing.assert_close(alpha.grad[1], torch.tensor([0.3, -0.4, 0, 0], dtype=torch.float64) / 0.49)
    prob, _ = xa.focal_reassign(alpha.detach()[1:], "prob")
    thr = (alpha[1] ** 1.5).sum() / alpha[1].sqrt().sum()  # ~0.286: keeps 0.4 and 0.3
    assert (prob[0] > 0).tolist() == (alpha[1] > thr).tolist() == [True, True, False, False]


# ---- aggregation ----------------------------------------------------------------------------
def test_logsumexp_is_stable_for_large_lambda():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(4, 7, generator=g, dtype=torch.float64) * 2 - 1
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[0, 3:] = False
    for lam in (20.0, 50.0):
        want = torch.stack([torch.log(torch.exp(lam * r[b][mask[b]]).sum()) / lam for b in range(4)])
        for dtype in (torch.float16, torch.float32):  # exp(20) overflows float16
            got = xa.aggregate(r.to(dtype), "LogSumExp", lam, mask=mask)
            assert got.dtype == torch.float32 and torch.isfinite(got).all()
            torch.testing.assert_close(
                got.double(), want, atol=2e-3 if dtype == torch.float16 else 1e-6, rtol=0
            )
    huge = xa.aggregate(torch.tensor([[1.0, 0.5]]), "LogSumExp", 1000.0)
    assert math.isclose(float(huge), 1.0, abs_tol=1e-6)


def test_masked_aggregations_ignore_padded_queries():
    r = torch.tensor([[0.5, -0.25, 9.0]])
    mask = torch.tensor([[True, True, False]])
    assert float(xa.aggregate(r, "Mean", mask=mask)) == 0.125
    assert float(xa.aggregate(r, "Sum", mask=mask)) == 0.25
    assert float(xa.aggregate(r, "Max", mask=mask)) == 0.5


def test_helpers_follow_the_reference_eps_placement():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(xa.l2norm(x), x / (torch.tensor([[5.0], [0.0]], dtype=torch.float64) + 1e-8))
    assert float(xa.cosine_similarity(x[1:], x[:1])) == 0.0
    with pytest.raises(ValueError):
        xa.scan_scores(torch.zeros(1, K, D), torch.zeros(1, 2, D), torch.tensor([2]), raw_feature_norm="x")
    with pytest.raises(ValueError):
        xa.scan_scores(torch.zeros(2, K, D), torch.zeros(1, 2, D), torch.tensor([2]), paired=True)
    for bad in ([0], [3]):  # lengths must lie in [1, L]
        with pytest.raises(ValueError):
            xa.bfan_scores(torch.zeros(1, K, D), torch.zeros(1, 2, D), torch.tensor(bad))
