"""Cross attention: the scores of SCAN (t2i, i2t) and BFAN (focal attention), docs/models.md.

Inputs: image region features `img` (B_i, k, d), padded word features `words` (B_c, L, d) and the
true caption `lengths` (B_c,). Every function has two modes:
- all pairs (`paired=False`): (B_i, B_c) scores, captions processed `chunk` at a time so memory
  stays bounded, in order of length so each chunk is cut to its own longest caption; every pair
  is independent, so neither chunking nor the order changes any score;
- paired (`paired=True`, B_i == B_c): (B,) scores of image b against caption b only.
With a gradient to compute, accel/pairs.py scores the same blocks with a backward that visits only
the pairs that need one (`sparse_grad`, for hardest-negative losses) and differentiates the products
by hand; the values and gradients are those of the plain code here.

Padded words never participate: they are zeroed (so they add nothing to a query-axis
normalisation or a Gram matrix), set to -inf before softmaxes over words, and left out of the
aggregation. Changing padded values changes nothing.

All pairs of a `Block` share one layout, S[..., j, r] = <word j, region r> of shape (..., L, k)
(leading dims (B_i, c) for all pairs, (B,) when paired). For t2i the queries are the words (dim -2)
and the context the regions (dim -1); for i2t the other way round. As in the reference, the "first"
normalisation runs over the query axis and the attention softmax over the context axis.
The attended vectors a_q = sum_r alpha_qr C_r are never materialised:
  <x_q, a_q> = sum_r alpha_qr S_qr,   ||a_q||^2 = alpha_q^T G alpha_q,   G = C C^T (context Gram),
which is exact and avoids the d-dimensional (B_i, B_c, n, d) tensor.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from accel import l2norm as fast_l2norm
from accel import pairs as fast_pairs

EPS = 1e-8
LEAKY_SLOPE = 0.1  # SCAN's "clipped" is a LeakyReLU with slope 0.1, not a ReLU
# clipped_leaky_l2norm is an alias of clipped_l2norm; relu_l2norm, l1norm and clipped_l1norm are
# extensions (the reference's l1 variants crash; docs/reference_behaviours.md).
RAW_FEATURE_NORMS = ("softmax", "l2norm", "clipped_l2norm", "clipped_leaky_l2norm", "relu_l2norm")
RAW_FEATURE_NORMS += ("clipped", "no_norm", "l1norm", "clipped_l1norm")
AGG_FUNCS = ("LogSumExp", "Mean", "Max", "Sum")
FOCAL_TYPES = ("equal", "prob")
DIRECTIONS = ("t2i", "i2t")


def l2norm(x, dim=-1, eps=EPS):
    """SCAN's l2norm: x / (||x|| + eps). An all-zero row stays zero: it is divided by 1 + eps, so its
    gradient is finite (the reference divides by eps; docs/reference_behaviours.md)."""
    if fast_l2norm.applies(x):
        return fast_l2norm.l2norm(x, dim, eps)  # the same, with a 4-pass backward
    if dim in (-1, x.dim() - 1):
        norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)  # its gradient at 0 is 0
        return x / (torch.where(norm > 0, norm, torch.ones_like(norm)) + eps)
    # vector_norm over an inner dimension is several times slower than this on the CPU. An all-zero
    # row takes the root of 1, not of 0, whose derivative is infinite.
    squares = (x * x).sum(dim=dim, keepdim=True)
    return x / (torch.where(squares > 0, squares, torch.ones_like(squares)).sqrt() + eps)


def l1norm(x, dim=-1, eps=EPS):
    """x / (sum |x| + eps)."""
    return x / (x.abs().sum(dim=dim, keepdim=True) + eps)


def cosine_similarity(x1, x2, dim=-1, eps=EPS):
    """(x1 . x2) / max(||x1|| ||x2||, eps), as the reference; never squeezes."""
    num = (x1 * x2).sum(dim=dim)
    den = torch.linalg.vector_norm(x1, dim=dim) * torch.linalg.vector_norm(x2, dim=dim)
    return num / den.clamp_min(eps)


def normalize_over_queries(scores, raw_feature_norm, dim=-2, mask=None):
    """SCAN's "first" normalisation of `scores` along the query axis `dim`, for each context item.

    mask: bool, broadcastable to scores, False at padded queries; they count as 0 (-inf for
    softmax) and come out 0.
    """
    if raw_feature_norm not in RAW_FEATURE_NORMS:
        raise ValueError(f"unknown raw_feature_norm {raw_feature_norm!r}; choose from {RAW_FEATURE_NORMS}")
    if raw_feature_norm == "softmax":
        x = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(x, dim=dim)
    x = scores if mask is None else scores.masked_fill(~mask, 0.0)
    if raw_feature_norm in ("clipped_l2norm", "clipped_leaky_l2norm", "clipped", "clipped_l1norm"):
        x = F.leaky_relu(x, LEAKY_SLOPE)
    elif raw_feature_norm == "relu_l2norm":
        x = F.relu(x)
    if raw_feature_norm.endswith("l2norm"):
        return l2norm(x, dim=dim)
    if raw_feature_norm.endswith("l1norm"):
        return l1norm(x, dim=dim)
    return x  # clipped, no_norm


def context_softmax(normed, lambda_softmax, dim=-1, mask=None):
    """alpha: per query, softmax along the context axis `dim` of lambda * N; padded context
    (False in `mask`, broadcastable) gets weight 0."""
    x = lambda_softmax * normed
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return torch.softmax(x, dim=dim)


def focal_reassign(alpha, focal_type, dim=-1, mask=None):
    """BFAN focal re-assignment of alpha along the context axis `dim` (docs/models.md).

    Returns (alpha', fallback) with fallback = alpha's shape without `dim`, True where the guard fired.
    H_qr = 1[F_qr > 0] (strict) is a hard mask computed without gradient:
      equal: F_qr = s alpha_qr - sum_t alpha_qt          (s = number of real context items)
      prob:  F_qr = alpha_qr sum_t sqrt(alpha_qt) - sum_t alpha_qt^1.5   (closed form of
             sum_t (alpha_qr - alpha_qt) sqrt(alpha_qt); O(s) instead of the reference's s x s)
    alpha'_qr = H_qr alpha_qr / sum_t H_qt alpha_qt. Guard: a query whose H is all 0 (the reference
    divides 0/0, e.g. s = 1 with `equal`) keeps its pre-assigned alpha.
    mask: bool, broadcastable to alpha, False at padded context items.
    """
    if focal_type not in FOCAL_TYPES:
        raise ValueError(f"unknown focal_type {focal_type!r}; choose from {FOCAL_TYPES}")
    with torch.no_grad():
        a = alpha.detach()
        if focal_type == "equal":
            s = a.shape[dim] if mask is None else mask.sum(dim=dim, keepdim=True).to(a.dtype)
            f = s * a - a.sum(dim=dim, keepdim=True)
        else:
            root = a.sqrt()
            f = a * root.sum(dim=dim, keepdim=True) - (a * root).sum(dim=dim, keepdim=True)
        keep = f > 0
        if mask is not None:
            keep &= mask
        fallback = ~keep.any(dim=dim, keepdim=True)
    kept = alpha * keep.to(alpha.dtype)
    denom = kept.sum(dim=dim, keepdim=True)
    reassigned = kept / torch.where(fallback, torch.ones_like(denom), denom)
    return torch.where(fallback, alpha, reassigned), fallback.squeeze(dim)


def aggregate(sims, agg_func="LogSumExp", lambda_lse=6.0, mask=None):
    """Aggregate per-query similarities R (..., m) over real queries (mask (..., m)) -> (...,).

    LogSumExp is (1/lambda) logsumexp(lambda R), evaluated stably in at least float32.
    """
    if agg_func not in AGG_FUNCS:
        raise ValueError(f"unknown agg_func {agg_func!r}; choose from {AGG_FUNCS}")
    sims = sims.to(torch.promote_types(sims.dtype, torch.float32))
    if agg_func in ("LogSumExp", "Max"):
        x = sims if mask is None else sims.masked_fill(~mask, float("-inf"))
        if agg_func == "Max":
            return x.max(dim=-1).values
        return torch.logsumexp(lambda_lse * x, dim=-1) / lambda_lse
    total = (sims if mask is None else sims.masked_fill(~mask, 0.0)).sum(dim=-1)
    if agg_func == "Sum":
        return total
    count = sims.shape[-1] if mask is None else mask.sum(dim=-1).to(total.dtype)
    return total / count


def attended_cosines(scores, alpha, query_norms, context, dim, gram=True):
    """R_q = cos(x_q, a_q), a_q = sum_r alpha_qr c_r, for S and alpha of layout (..., L, k).

    gram=True (all pairs): `context` is the context's Gram matrix, and ||a_q||^2 = alpha^T G alpha:
      dim = -1 (t2i, context = regions): (B_i, k, k), one per image (leading dim 0);
      dim = -2 (i2t, context = words): (..., L, L) broadcastable to the leading dims.
    gram=False (paired, one pair per leading index): `context` is the features themselves,
      (B, k, d) regions for t2i, (B, L, d) words for i2t, and a_q is formed: a Gram matrix per
      pair would cost k^2 d against the L k d of the attended vectors.
    query_norms: ||x_q||, shaped like the result.
    """
    num = (alpha * scores).sum(dim=dim)
    if not gram:
        attended = alpha @ context if dim == -1 else alpha.transpose(-1, -2) @ context
        return num / (query_norms * torch.linalg.vector_norm(attended, dim=-1)).clamp_min(EPS)
    if dim == -1:
        gram_alpha = (alpha.flatten(1, -2) @ context).view_as(alpha)
    else:
        gram_alpha = torch.matmul(context, alpha)
    sq = (gram_alpha * alpha).sum(dim=dim)
    # tiny floor: sqrt stays differentiable; values are unchanged for any real attended vector
    norm = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
    return num / (query_norms * norm).clamp_min(EPS)


class Block(NamedTuple):
    """The tensors of a block of image-caption pairs (leading dims `...`: (B_i, c) for all pairs
    of B_i images and a chunk of c captions, size 1 where a tensor belongs to one side; (B,) for
    B given pairs)."""

    s: torch.Tensor  # (..., L, k) <word j, region r>
    word_mask: torch.Tensor  # (..., L) True at real words
    word_norms: torch.Tensor  # (..., L)
    region_norms: torch.Tensor  # (..., k)
    img_context: torch.Tensor  # the regions' Gram matrices (gram) or the regions themselves
    cap_context: torch.Tensor  # the words' Gram matrices (gram) or the words themselves
    gram: bool  # see `attended_cosines`


def _attend(block, direction, normalize, lambda_softmax, focal_type=None):
    """One direction for every pair of a block -> (R (..., L) for t2i / (..., k) for i2t, fallback)."""
    s, rows = block.s, block.word_mask.unsqueeze(-1)  # (..., L, 1): padded word rows of S
    if direction == "t2i":  # queries: words (dim -2); context: regions (dim -1)
        alpha = context_softmax(
            normalize_over_queries(s, normalize, dim=-2, mask=rows), lambda_softmax, dim=-1
        )
        fallback = None
        if focal_type is not None:
            alpha, fallback = focal_reassign(alpha, focal_type, dim=-1)
            fallback = fallback & block.word_mask
        return attended_cosines(
            s, alpha, block.word_norms, block.img_context, dim=-1, gram=block.gram
        ), fallback
    alpha = context_softmax(normalize_over_queries(s, normalize, dim=-1), lambda_softmax, dim=-2, mask=rows)
    fallback = None
    if focal_type is not None:
        alpha, fallback = focal_reassign(alpha, focal_type, dim=-2, mask=rows)
    return attended_cosines(
        s, alpha, block.region_norms, block.cap_context, dim=-2, gram=block.gram
    ), fallback


def _prepare(img, words, lengths):
    """Validate, trim words to the longest real caption, zero padding; returns (words, mask,
    lengths as a CPU int64 tensor).

    The length checks read `lengths`: keep it on the CPU to avoid device syncs.
    """
    if img.dim() != 3 or words.dim() != 3 or img.shape[-1] != words.shape[-1]:
        raise ValueError(
            f"expected img (B_i, k, d) and words (B_c, L, d), got {tuple(img.shape)}, {tuple(words.shape)}"
        )
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    if lengths.shape != words.shape[:1]:
        raise ValueError(f"lengths {tuple(lengths.shape)} do not match {words.shape[0]} captions")
    if len(lengths) == 0:
        return words, torch.zeros(words.shape[:2], dtype=torch.bool, device=words.device), lengths
    min_len, max_len = (int(x) for x in torch.aminmax(lengths))
    if max_len > words.shape[1] or min_len < 1:
        raise ValueError(f"caption lengths must lie in [1, {words.shape[1]}]")
    words = words[:, :max_len]
    mask = torch.arange(max_len, device=words.device) < lengths.to(words.device)[:, None]  # (B_c, L)
    if _padding_is_zero(words, mask):
        return words, mask, lengths
    return words.masked_fill(~mask.unsqueeze(-1), 0.0), mask, lengths


def _padding_is_zero(words, mask):
    """True if every padded word vector is already zero (the encoders' output), checked on the
    CPU only: masking would copy the whole (B_c, L, d) tensor, forward and backward, while the
    check reads the padded rows alone. (On a GPU the check would cost a device sync.)
    Skipping the mask changes no gradient either: every score's path to a padded row is masked
    downstream (S rows, attention, aggregation), so its gradient there is zero."""
    if words.device.type != "cpu":
        return False
    padded = ~mask
    return not bool(padded.any()) or not bool(words[padded].any())


def _pair_blocks(img, words, mask, lengths, paired, chunk):
    """Yield the `Block`s of the pairs: one of B pairs when paired (contexts: the features
    themselves, gram = False); else one per chunk of c captions, (B_i, c) pairs (contexts: Gram
    matrices, image (B_i, k, k) and caption (1, c, L, L)), chunks in `_caption_order(lengths)`,
    each cut to its longest caption."""
    region_norms = torch.linalg.vector_norm(img, dim=-1)  # (B_i, k)
    if paired:  # `_score` checked that there are as many images as captions
        word_norms = torch.linalg.vector_norm(words, dim=-1)  # (B, L)
        yield Block(words @ img.transpose(1, 2), mask, word_norms, region_norms, img, words, gram=False)
        return
    img_gram = img @ img.transpose(1, 2)  # (B_i, k, k)
    n_img, k, d = img.shape
    flat_img = img.reshape(n_img * k, d)
    for rows in _chunks(lengths, chunk):
        longest = int(lengths[rows[0]])
        w, m = words[rows.to(words.device), :longest], mask[rows.to(mask.device), :longest]
        c, n = w.shape[:2]
        # S[i, j, q, r] = <word q of caption j, region r of image i>, made contiguous: (B_i, c, L, k)
        s = (w.reshape(c * n, d) @ flat_img.t()).view(c, n, n_img, k).permute(2, 0, 1, 3).contiguous()
        word_norms, cap_gram = torch.linalg.vector_norm(w, dim=-1), w @ w.transpose(1, 2)  # (c, L), (c, L, L)
        yield Block(s, m[None], word_norms[None], region_norms[:, None], img_gram, cap_gram[None], gram=True)


def _caption_order(lengths):
    """Captions by decreasing length (stable): chunks of similar lengths waste little padding."""
    return torch.argsort(lengths, descending=True, stable=True)


def _chunks(lengths, chunk):
    """Caption indices (CPU) of each all-pairs chunk of `chunk` captions, in `_caption_order`."""
    order = _caption_order(lengths)
    step = max(1, int(chunk)) if chunk else max(1, len(order))
    return [order[start : start + step] for start in range(0, len(order), step)]


def _check_paired(img, words):
    if img.shape[0] != words.shape[0]:
        raise ValueError(f"paired mode needs as many images as captions ({img.shape[0]} vs {words.shape[0]})")


def _score(img, words, lengths, block_scores, paired, chunk, sparse_grad):
    """(scores, fallbacks) of every pair (or of the B given pairs when `paired`), scored block by
    block with block_scores(Block) -> (scores of the block's pairs, fallback count or None)."""
    words, mask, lengths = _prepare(img, words, lengths)
    fallbacks = torch.zeros((), dtype=torch.long, device=img.device)
    if words.shape[0] == 0 or img.shape[0] == 0:
        return img.new_zeros((img.shape[0],) if paired else (img.shape[0], words.shape[0])), fallbacks
    if paired:
        _check_paired(img, words)

    def score_pairs(s, word_mask, word_norms, region_norms, img_gram, cap_gram):
        """Pairs given by their S and Gram matrices: how accel/pairs.py re-scores them."""
        return block_scores(Block(s, word_mask, word_norms, region_norms, img_gram, cap_gram, gram=True))

    if fast_pairs.applies(img, words):
        if paired:
            return fast_pairs.paired_scores(img, words, mask, score_pairs)
        if sparse_grad:  # the backward visits only the pairs that get a gradient

            def score_chunks(img, words):
                for block in _pair_blocks(img, words, mask, lengths, False, chunk):
                    yield (block.s, *block_scores(block))

            return fast_pairs.sparse_backward_scores(
                img, words, mask, _chunks(lengths, chunk), score_chunks, score_pairs
            )
    parts = []
    for block in _pair_blocks(img, words, mask, lengths, paired, chunk):
        part, fell_back = block_scores(block)
        parts.append(part)
        if fell_back is not None:
            fallbacks = fallbacks + fell_back
    if paired:
        return parts[0], fallbacks
    scores = torch.cat(parts, dim=1)  # all-pairs columns back in caption order
    return scores[:, torch.argsort(_caption_order(lengths)).to(scores.device)], fallbacks


def scan_scores(
    img,
    words,
    lengths,
    direction="t2i",
    raw_feature_norm="clipped_l2norm",
    agg_func="LogSumExp",
    lambda_softmax=9.0,
    lambda_lse=6.0,
    paired=False,
    chunk=32,
    sparse_grad=False,
):
    """SCAN similarities: (B_i, B_c) for all pairs, or (B,) when `paired` (docs/models.md).

    t2i: words attend to regions, R_j = cos(w_j, a_j) aggregated over the caption's real words;
    i2t: regions attend to the real words, R_i = cos(v_i, a_i) aggregated over the k regions.
    sparse_grad: all pairs for a hardest-negative loss, whose backward may then visit only the
    pairs that receive a gradient (accel/pairs.py). Same values and gradients.
    """
    for value, allowed, what in (
        (direction, DIRECTIONS, "direction"),
        (raw_feature_norm, RAW_FEATURE_NORMS, "raw_feature_norm"),
        (agg_func, AGG_FUNCS, "agg_func"),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose from {allowed}")

    def block_scores(block):
        r, _ = _attend(block, direction, raw_feature_norm, lambda_softmax)
        real = block.word_mask.expand(r.shape) if direction == "t2i" else None
        return aggregate(r, agg_func, lambda_lse, mask=real), None

    return _score(img, words, lengths, block_scores, paired, chunk, sparse_grad)[0]


def bfan_scores(
    img,
    words,
    lengths,
    focal_type="equal",
    lambda_softmax=20.0,
    paired=False,
    chunk=32,
    return_fallbacks=False,
    sparse_grad=False,
):
    """BFAN similarity: mean_j cos(w_j, a_j^t2i) + mean_i cos(v_i, a_i^i2t), both with focal
    attention of `focal_type` after the clipped_l2norm first normalisation, same lambda
    (docs/models.md).

    Returns the scores, or (scores, n_fallbacks) with n_fallbacks a 0-dim int64 tensor counting the
    (pair, real query) rows where every H was 0 and the pre-assigned attention was kept.
    sparse_grad: as in `scan_scores`.
    """
    if focal_type not in FOCAL_TYPES:
        raise ValueError(f"unknown focal_type {focal_type!r}; choose from {FOCAL_TYPES}")

    def block_scores(block):
        r_t2i, fb_t2i = _attend(block, "t2i", "clipped_l2norm", lambda_softmax, focal_type)
        r_i2t, fb_i2t = _attend(block, "i2t", "clipped_l2norm", lambda_softmax, focal_type)
        scores = aggregate(r_t2i, "Mean", mask=block.word_mask.expand(r_t2i.shape)) + aggregate(r_i2t, "Mean")
        return scores, fb_t2i.sum() + fb_i2t.sum()

    scores, fallbacks = _score(img, words, lengths, block_scores, paired, chunk, sparse_grad)
    return (scores, fallbacks) if return_fallbacks else scores
