"""Batched cross-attention scoring kernels of SCAN (t2i, i2t) and BFAN (focal attention).

Spec: /work/shared/spec/scan_bfan_vsepp_data.md §A.1, A.4, A.5, B.2, B.3.

Inputs: image region features `img` (B_i, k, d), padded word features `words` (B_c, L, d) and the
true caption `lengths` (B_c,). Every function has two modes:
- all pairs (`paired=False`): (B_i, B_c) scores, captions processed `chunk` at a time so memory
  stays bounded, in order of length so each chunk is cut to its own longest caption; every pair
  is independent, so neither chunking nor the order changes any score;
- paired (`paired=True`, B_i == B_c): (B,) scores of image b against caption b only.

Padded words never participate: they are zeroed (so they add nothing to a query-axis
normalisation or a Gram matrix), set to -inf before softmaxes over words, and left out of the
aggregation. Changing padded values changes nothing.

All pairs of a block share one layout, S[..., j, r] = <word j, region r> of shape (..., L, k)
(leading dims (B_i, c) for all pairs, (B,) when paired). For t2i the queries are the words (dim -2)
and the context the regions (dim -1); for i2t the other way round. As in the reference, the "first"
normalisation runs over the query axis and the attention softmax over the context axis.
The attended vectors a_q = sum_r alpha_qr C_r are never materialised (spec A.5 [ours]):
  <x_q, a_q> = sum_r alpha_qr S_qr,   ||a_q||^2 = alpha_q^T G alpha_q,   G = C C^T (context Gram),
which is exact and avoids the d-dimensional (B_i, B_c, n, d) tensor.
"""
import torch
import torch.nn.functional as F

EPS = 1e-8
LEAKY_SLOPE = 0.1  # SCAN's "clipped" is a LeakyReLU with slope 0.1, not a ReLU
# clipped_leaky_l2norm is an alias of clipped_l2norm; relu_l2norm, l1norm and clipped_l1norm are
# extensions (the reference's l1 variants crash, spec A.4).
RAW_FEATURE_NORMS = ("softmax", "l2norm", "clipped_l2norm", "clipped_leaky_l2norm", "relu_l2norm",
                     "clipped", "no_norm", "l1norm", "clipped_l1norm")
AGG_FUNCS = ("LogSumExp", "Mean", "Max", "Sum")
FOCAL_TYPES = ("equal", "prob")
DIRECTIONS = ("t2i", "i2t")


def l2norm(x, dim=-1, eps=EPS):
    """SCAN's l2norm: x / (sqrt(sum x^2) + eps); eps is added to the norm, zero stays zero."""
    sq = (x * x).sum(dim=dim, keepdim=True)
    # an all-zero row gives 0 / (1 + eps) = 0 as well, without the infinite gradient of sqrt at 0
    return x / (torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() + eps)


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
    """BFAN focal re-assignment (spec B.2) of alpha along the context axis `dim`.

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


def attended_cosines(scores, alpha, query_norms, context_gram, dim):
    """R_q = cos(x_q, a_q), a_q = sum_r alpha_qr c_r, for S and alpha of layout (..., L, k).

    dim = -1 (t2i, context = regions): context_gram (B_i, k, k), one per image (leading dim 0);
    dim = -2 (i2t, context = words): context_gram (..., L, L) broadcastable to the leading dims.
    query_norms: ||x_q||, shaped like the result.
    """
    num = (alpha * scores).sum(dim=dim)
    if dim == -1:
        gram_alpha = (alpha.flatten(1, -2) @ context_gram).view_as(alpha)
    else:
        gram_alpha = torch.matmul(context_gram, alpha)
    sq = (gram_alpha * alpha).sum(dim=dim)
    # tiny floor: sqrt stays differentiable; values are unchanged for any real attended vector
    norm = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
    return num / (query_norms * norm).clamp_min(EPS)


def _attend(block, direction, normalize, lambda_softmax, focal_type=None):
    """One direction for every pair of a block -> (R (..., L) for t2i / (..., k) for i2t, fallback)."""
    s, word_mask, word_norms, region_norms, img_gram, cap_gram = block
    rows = word_mask.unsqueeze(-1)  # (..., L, 1): padded word rows of S
    if direction == "t2i":          # queries: words (dim -2); context: regions (dim -1)
        alpha = context_softmax(normalize_over_queries(s, normalize, dim=-2, mask=rows), lambda_softmax, dim=-1)
        fallback = None
        if focal_type is not None:
            alpha, fallback = focal_reassign(alpha, focal_type, dim=-1)
            fallback = fallback & word_mask
        return attended_cosines(s, alpha, word_norms, img_gram, dim=-1), fallback
    alpha = context_softmax(normalize_over_queries(s, normalize, dim=-1), lambda_softmax, dim=-2, mask=rows)
    fallback = None
    if focal_type is not None:
        alpha, fallback = focal_reassign(alpha, focal_type, dim=-2, mask=rows)
    return attended_cosines(s, alpha, region_norms, cap_gram, dim=-2), fallback


def _prepare(img, words, lengths):
    """Validate, trim words to the longest real caption, zero padding; returns (words, mask,
    lengths as a CPU int64 tensor).

    The length checks read `lengths`: keep it on the CPU to avoid device syncs.
    """
    if img.dim() != 3 or words.dim() != 3 or img.shape[-1] != words.shape[-1]:
        raise ValueError(f"expected img (B_i, k, d) and words (B_c, L, d), got {tuple(img.shape)}, "
                         f"{tuple(words.shape)}")
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
    return words.masked_fill(~mask.unsqueeze(-1), 0.0), mask, lengths


def _pair_blocks(img, words, mask, lengths, paired, chunk):
    """Yield blocks (S (..., L, k), word mask (..., L), word norms (..., L), region norms (..., k),
    image Gram (B_i, k, k), caption Gram (..., L, L)) with leading dims (B,) when paired, else
    (B_i, c) for each chunk of c captions (size-1 dims where a factor belongs to one side only).
    All pairs: chunks follow `_caption_order(lengths)`, each cut to its longest caption."""
    img_gram = img @ img.transpose(1, 2)                   # (B_i, k, k)
    region_norms = torch.linalg.vector_norm(img, dim=-1)   # (B_i, k)
    if paired:
        if img.shape[0] != words.shape[0]:
            raise ValueError(f"paired mode needs as many images as captions ({img.shape[0]} vs {words.shape[0]})")
        yield (words @ img.transpose(1, 2), mask, torch.linalg.vector_norm(words, dim=-1), region_norms,
               img_gram, words @ words.transpose(1, 2))
        return
    n_img, k, d = img.shape
    step = max(1, int(chunk)) if chunk else max(1, words.shape[0])
    flat_img = img.reshape(n_img * k, d)
    order = _caption_order(lengths)
    for start in range(0, words.shape[0], step):
        rows = order[start:start + step]
        longest = int(lengths[rows[0]])
        w, m = words[rows.to(words.device), :longest], mask[rows.to(mask.device), :longest]
        c, n = w.shape[:2]
        # S[i, j, q, r] = <word q of caption j, region r of image i>, made contiguous: (B_i, c, L, k)
        s = (w.reshape(c * n, d) @ flat_img.t()).view(c, n, n_img, k).permute(2, 0, 1, 3).contiguous()
        yield (s, m.unsqueeze(0), torch.linalg.vector_norm(w, dim=-1).unsqueeze(0),
               region_norms.unsqueeze(1), img_gram, (w @ w.transpose(1, 2)).unsqueeze(0))


def _empty(img, words, paired):
    return img.new_zeros((img.shape[0],) if paired else (img.shape[0], words.shape[0]))


def _caption_order(lengths):
    """Captions by decreasing length (stable): chunks of similar lengths waste little padding."""
    return torch.argsort(lengths, descending=True, stable=True)


def _collect(parts, paired, lengths):
    """The blocks' scores, all-pairs columns back in caption order."""
    if paired:
        return parts[0]
    scores = torch.cat(parts, dim=1)
    return scores[:, torch.argsort(_caption_order(lengths)).to(scores.device)]


def scan_scores(img, words, lengths, direction="t2i", raw_feature_norm="clipped_l2norm",
                agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0, paired=False, chunk=32):
    """SCAN similarities (spec A.4-A.5): (B_i, B_c) for all pairs, or (B,) when `paired`.

    t2i: words attend to regions, R_j = cos(w_j, a_j) aggregated over the caption's real words;
    i2t: regions attend to the real words, R_i = cos(v_i, a_i) aggregated over the k regions.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")
    if raw_feature_norm not in RAW_FEATURE_NORMS:
        raise ValueError(f"unknown raw_feature_norm {raw_feature_norm!r}; choose from {RAW_FEATURE_NORMS}")
    if agg_func not in AGG_FUNCS:
        raise ValueError(f"unknown agg_func {agg_func!r}; choose from {AGG_FUNCS}")
    words, mask, lengths = _prepare(img, words, lengths)
    if words.shape[0] == 0 or img.shape[0] == 0:
        return _empty(img, words, paired)
    parts = []
    for block in _pair_blocks(img, words, mask, lengths, paired, chunk):
        r, _ = _attend(block, direction, raw_feature_norm, lambda_softmax)
        real = block[1].expand(r.shape) if direction == "t2i" else None
        parts.append(aggregate(r, agg_func, lambda_lse, mask=real))
    return _collect(parts, paired, lengths)


def scan_t2i_scores(img, words, lengths, **options):
    """SCAN text-to-image attention scores; see `scan_scores`."""
    return scan_scores(img, words, lengths, direction="t2i", **options)


def scan_i2t_scores(img, words, lengths, **options):
    """SCAN image-to-text attention scores; see `scan_scores`."""
    return scan_scores(img, words, lengths, direction="i2t", **options)


def bfan_scores(img, words, lengths, focal_type="equal", lambda_softmax=20.0, paired=False, chunk=32,
                return_fallbacks=False):
    """BFAN similarity (spec B.3): mean_j cos(w_j, a_j^t2i) + mean_i cos(v_i, a_i^i2t), both with
    focal attention of `focal_type` after the clipped_l2norm first normalisation, same lambda.

    Returns the scores, or (scores, n_fallbacks) with n_fallbacks a 0-dim int64 tensor counting the
    (pair, real query) rows where every H was 0 and the pre-assigned attention was kept.
    """
    if focal_type not in FOCAL_TYPES:
        raise ValueError(f"unknown focal_type {focal_type!r}; choose from {FOCAL_TYPES}")
    words, mask, lengths = _prepare(img, words, lengths)
    fallbacks = torch.zeros((), dtype=torch.long, device=img.device)
    if words.shape[0] == 0 or img.shape[0] == 0:
        scores = _empty(img, words, paired)
    else:
        parts = []
        for block in _pair_blocks(img, words, mask, lengths, paired, chunk):
            r_t2i, fb_t2i = _attend(block, "t2i", "clipped_l2norm", lambda_softmax, focal_type)
            r_i2t, fb_i2t = _attend(block, "i2t", "clipped_l2norm", lambda_softmax, focal_type)
            parts.append(aggregate(r_t2i, "Mean", mask=block[1].expand(r_t2i.shape)) + aggregate(r_i2t, "Mean"))
            fallbacks = fallbacks + fb_t2i.sum() + fb_i2t.sum()
        scores = _collect(parts, paired, lengths)
    return (scores, fallbacks) if return_fallbacks else scores
