"""The sparse backward of all-pairs cross-attention scores (accel/pairs.py) against plain
autograd through the same scores, and the hand-written l2norm backward against autograd."""

import pytest
import torch

from models import attention as xattn
from models import create_model
from models.losses import LossConfig, retrieval_loss

LENGTHS = torch.tensor([3, 7, 1, 5, 7, 2])


def features(seed=0, n_img=5, k=4, d=8):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n_img, k, d, dtype=torch.float64, generator=g)
    words = torch.randn(len(LENGTHS), int(LENGTHS.max()), d, dtype=torch.float64, generator=g)
    return img, words


def incoming_gradient(kind, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    dense = torch.randn(shape, dtype=torch.float64, generator=g)
    if kind == "dense":
        return dense
    keep = torch.zeros(shape, dtype=torch.bool)  # a hardest-negative pattern
    keep[torch.arange(shape[0]), torch.randint(shape[1], (shape[0],), generator=g)] = True
    keep[torch.randint(shape[0], (shape[1],), generator=g), torch.arange(shape[1])] = True
    return dense * keep


def both_ways(score, make_features, incoming, want=("img", "words")):
    """[(scores, grads)] of score(img, words, flag) for flag False and True, with the incoming
    gradient incoming(scores.shape); gradients of the features named in `want`."""
    results = []
    for flag in (False, True):
        img, words = make_features()
        img.requires_grad_("img" in want)
        words.requires_grad_("words" in want)
        scores = score(img, words, flag)
        leaves = [t for t in (img, words) if t.requires_grad]
        grads = torch.autograd.grad(scores, leaves, incoming(scores.shape), allow_unused=True)
        results.append(
            (scores.detach(), [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)])
        )
    return results


def both_paths(score, grad_kind, want=("img", "words")):
    """(scores, grads) of score(img, words, sparse_grad) for sparse_grad False and True."""
    return both_ways(score, features, lambda shape: incoming_gradient(grad_kind, shape), want)


def assert_same(results):
    (dense_scores, dense_grads), (sparse_scores, sparse_grads) = results
    torch.testing.assert_close(sparse_scores, dense_scores, atol=1e-12, rtol=1e-12)
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("direction", xattn.DIRECTIONS)
@pytest.mark.parametrize(
    "norm,agg",
    [("clipped_l2norm", "LogSumExp"), ("softmax", "Mean"), ("l2norm", "Max"), ("clipped_l1norm", "Sum")],
)
@pytest.mark.parametrize("grad_kind", ["hardest", "dense", "zero"])
def test_scan_sparse_backward_equals_autograd(direction, norm, agg, grad_kind):
    def score(img, words, sparse):
        return xattn.scan_scores(
            img,
            words,
            LENGTHS,
            direction=direction,
            raw_feature_norm=norm,
            agg_func=agg,
            chunk=2,
            sparse_grad=sparse,
        )

    results = both_paths(score, grad_kind)
    assert_same(results)
    if grad_kind == "zero":
        assert all((g == 0).all() for g in results[1][1])


@pytest.mark.parametrize("focal", xattn.FOCAL_TYPES)
@pytest.mark.parametrize("want", [("img", "words"), ("img",), ("words",)])
def test_bfan_sparse_backward_equals_autograd_and_counts_fallbacks_once(focal, want):
    counts = []

    def score(img, words, sparse):
        scores, fallbacks = xattn.bfan_scores(
            img, words, LENGTHS, focal_type=focal, chunk=4, return_fallbacks=True, sparse_grad=sparse
        )
        counts.append(int(fallbacks))
        return scores

    assert_same(both_paths(score, "hardest", want))
    assert counts[0] == counts[1]


def test_without_gradients_the_plain_path_runs():
    img, words = features()
    with torch.no_grad():
        plain = xattn.scan_scores(img, words, LENGTHS, sparse_grad=False)
        sparse = xattn.scan_scores(img.requires_grad_(), words, LENGTHS, sparse_grad=True)
    assert sparse.grad_fn is None and torch.equal(plain, sparse)


@pytest.mark.parametrize("name", ["scan", "bfan"])
def test_training_scores_give_the_dense_parameter_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, vocab_size=40, img_dim=12, embed_size=10, word_dim=6).double()
    images = torch.randn(5, 36, 12, dtype=torch.float64)
    ids, lengths = torch.randint(4, 40, (5, 8)), torch.tensor([8, 2, 5, 1, 6])
    grads = []
    for few in (False, True):
        model.zero_grad()
        scores = model.training_scores(model.encode_images(images), model.encode_captions(ids, lengths), few)
        retrieval_loss(scores, None, LossConfig(variant="baseline"))[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-11, rtol=1e-10, msg=n)


def plain_l2norm(x, dim, eps=xattn.EPS):
    sq = (x * x).sum(dim=dim, keepdim=True)
    return x / (torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() + eps)


@pytest.mark.parametrize("dim", [-1, -2, 0])
def test_l2norm_backward_matches_autograd_including_zero_vectors(dim):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: xattn.l2norm(t, dim=dim), (x.clone().requires_grad_(),))
    x[1, 2], x[2, :, 3], x[:, 1, 1] = 0, 0, 0  # zero vectors along each dim
    x.requires_grad_()
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((xattn.l2norm(x, dim=dim) * upstream).sum(), x)[0]
    want = torch.autograd.grad((plain_l2norm(x, dim) * upstream).sum(), x)[0]
    torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(
        xattn.l2norm(x.detach(), dim=dim), plain_l2norm(x.detach(), dim), atol=1e-15, rtol=1e-14
    )


@pytest.mark.parametrize("name", ["scan", "bfan"])
def test_sparse_backward_under_bf16_autocast_matches_dense_to_bf16_precision(name):
    """The backward re-scores pairs under the forward's autocast; features and Grams may then
    have different dtypes (bf16 image regions, float32 words), and the gradients still come back
    in each parameter's dtype."""
    torch.manual_seed(0)
    model = create_model(name, vocab_size=40, img_dim=12, embed_size=10, word_dim=6)
    images = torch.randn(5, 36, 12)
    ids, lengths = torch.randint(4, 40, (5, 8)), torch.tensor([8, 2, 5, 1, 6])
    grads = []
    for few in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = model.training_scores(
                model.encode_images(images), model.encode_captions(ids, lengths), few
            )
            loss = retrieval_loss(scores, None, LossConfig(variant="baseline"))[0]
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        assert grads[1][n].dtype == torch.float32
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=2e-2, rtol=2e-2, msg=n)


def test_several_passes_and_zero_vectors(monkeypatch):
    """More nonzero pairs than one backward pass takes, and zero region / word vectors (the
    norm-is-zero branches of the hand-written norm gradients)."""
    from accel import pairs as pair_recompute

    monkeypatch.setattr(pair_recompute, "PAIRS_PER_PASS", 3)

    def score(img, words, sparse):
        with torch.no_grad():
            img[1, 2] = 0
            words[3, 0] = 0
        return xattn.scan_scores(img, words, LENGTHS, direction="i2t", chunk=4, sparse_grad=sparse)

    assert_same(both_paths(score, "dense"))


def test_custom_backwards_refuse_a_second_derivative():
    """Their backwards hold saved values as constants: a second derivative must fail, not be wrong."""
    img, words = features()
    img.requires_grad_()
    scores = xattn.scan_scores(img, words, LENGTHS, sparse_grad=True)
    grad = torch.autograd.grad(scores.sum(), img, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(grad.sum(), img)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad((xattn.l2norm(x) * torch.arange(4.0)).sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad.pow(2).sum(), x)


# ---- paired scores (pair_recompute.paired_scores) --------------------------------------------
def paired_features(seed=3, k=4, d=8):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(len(LENGTHS), k, d, dtype=torch.float64, generator=g)
    words = torch.randn(len(LENGTHS), int(LENGTHS.max()), d, dtype=torch.float64, generator=g)
    words[torch.arange(words.shape[1])[None, :] >= LENGTHS[:, None]] = 0
    return img, words


def paired_against_diagonal(score, want=("img", "words")):
    """Gradients of the paired scores, and of the diagonal of the all-pairs matrix scored with
    plain autograd (no sparse backward), for the same incoming gradient."""

    def weights(shape):
        w = torch.linspace(-1.0, 2.0, shape[0], dtype=torch.float64)
        w[2] = 0
        return w

    def paired_or_diagonal(img, words, paired):
        scores = score(img, words, paired)
        return scores if paired else scores.diagonal()

    assert_same(both_ways(paired_or_diagonal, paired_features, weights, want))


@pytest.mark.parametrize("direction", xattn.DIRECTIONS)
@pytest.mark.parametrize(
    "norm,agg",
    [("clipped_l2norm", "LogSumExp"), ("softmax", "Mean"), ("l2norm", "Max"), ("clipped_l1norm", "Sum")],
)
def test_scan_paired_gradients_equal_the_diagonal_with_autograd(direction, norm, agg):
    paired_against_diagonal(
        lambda img, words, paired: xattn.scan_scores(
            img,
            words,
            LENGTHS,
            direction=direction,
            raw_feature_norm=norm,
            agg_func=agg,
            paired=paired,
            chunk=2,
        )
    )


@pytest.mark.parametrize("focal", xattn.FOCAL_TYPES)
@pytest.mark.parametrize("want", [("img", "words"), ("img",), ("words",)])
def test_bfan_paired_gradients_equal_the_diagonal_and_fallbacks_agree(focal, want):
    paired_against_diagonal(
        lambda img, words, paired: xattn.bfan_scores(
            img, words, LENGTHS, focal_type=focal, paired=paired, chunk=4
        ),
        want,
    )
    img, words = paired_features()
    with torch.no_grad():  # the plain paired blocks
        _, plain = xattn.bfan_scores(
            img, words, LENGTHS, focal_type=focal, paired=True, return_fallbacks=True
        )
    _, recomputed = xattn.bfan_scores(
        img.requires_grad_(), words, LENGTHS, focal_type=focal, paired=True, return_fallbacks=True
    )
    assert int(recomputed) == int(plain)


def test_paired_scores_with_and_without_a_gradient_agree_and_bf16_runs():
    img, words = paired_features()
    with torch.no_grad():
        plain = xattn.scan_scores(img, words, LENGTHS, paired=True)
    recomputed = xattn.scan_scores(img.clone().requires_grad_(), words, LENGTHS, paired=True)
    torch.testing.assert_close(recomputed.detach(), plain, atol=1e-12, rtol=1e-12)
    img32, words32 = img.float().requires_grad_(), words.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = xattn.bfan_scores(img32, words32, LENGTHS, paired=True)
    scores.float().sum().backward()
    assert img32.grad.dtype == torch.float32 and torch.isfinite(img32.grad).all()
    assert words32.grad.dtype == torch.float32 and torch.isfinite(words32.grad).all()
    with pytest.raises(ValueError, match="as many images"):
        xattn.scan_scores(img32[:3], words32, LENGTHS, paired=True)
