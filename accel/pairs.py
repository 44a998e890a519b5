"""All-pairs cross-attention scores whose backward only revisits the pairs that get a gradient.

A cross-attention model (SCAN, BFAN) pays for every entry of the (B_i, B_c) score matrix with a
pair computation, and plain autograd keeps every pair's attention tensors and backpropagates
through all of them. The hardest-negative losses (VSE++, AOQ) give a gradient to few entries:
the positives, the hardest caption of each image and the hardest image of each caption, at most
3B of B^2 (2.3% at B = 128). A pair whose score gets no gradient adds exactly zero to every
gradient, so here:

- forward: the all-pairs chunks are scored without autograd, and their word-region products S
  are kept (the same memory as autograd's copy of S, none of the intermediates);
- backward: the pairs (i, j) with a nonzero incoming gradient are re-scored with autograd from
  their kept (L, k) blocks of S and their Gram matrices, which gives dS, dG and the norm
  gradients of those pairs only; the products behind them (S = W R^T, G = R R^T, ||x||) are
  differentiated by hand, pair by pair: dW_j += dS_ij R_i, dR_i += dS_ij^T W_j.

The gradients are the dense ones up to float rounding (the same formulas). With a dense incoming
gradient (a loss summing over all negatives) this would be slower than plain autograd, so the
models use it only for hardest-negative losses (`training_scores(..., few_gradients=True)`).

`paired_scores` does the same for the B pairs (image b, caption b) of the offline scores: every
pair is re-scored, but the products are still differentiated by hand, into one gradient buffer
per side, instead of by autograd through six batched products of tiny matrices.

The caller (models/attention.py) scores pairs through `score_pairs(s, word_mask, word_norms,
region_norms, img_gram, cap_gram) -> (scores (P,), fallbacks or None)`, called with keywords:
S (P, L, k) of P pairs, their word mask (P, L), word norms (P, L), region norms (P, k) and the
image (P, k, k) and caption (P, L, L) Gram matrices.
"""

import torch
from torch.autograd.function import once_differentiable

import accel


def applies(img, words):
    """Whether the hand-differentiated scores are used: accelerated paths on, a gradient to compute."""
    return accel.enabled() and torch.is_grad_enabled() and (img.requires_grad or words.requires_grad)


PAIRS_PER_PASS = 4096  # pairs re-scored at a time in the backward (bounds its memory)


def sparse_backward_scores(img, words, mask, chunks, score_chunks, score_pairs):
    """(scores (B_i, B_c), fallbacks), scores differentiable in img (B_i, k, d) and words
    (B_c, L, d) (zero past each caption's length, `mask` (B_c, L) True at real words).

    chunks: list of caption-index tensors (CPU int64), the all-pairs chunks in scoring order;
    score_chunks(img, words): yields (S (B_i, c, L_chunk, k), scores (B_i, c), a 0-dim count of
    focal fallbacks or None) for each chunk, in that order; score_pairs: see the module doc.
    Fallbacks are counted in the forward only.
    """
    return _SparseBackwardScores.apply(img, words, mask, chunks, score_chunks, score_pairs)


def paired_scores(img, words, mask, score_pairs):
    """(scores (B,), fallbacks) of the pairs (image b, caption b), differentiable in img (B, k, d)
    and words (B, L, d) (zero past each caption's length, `mask` (B, L) True at real words).

    The same scores as models/attention.py's paired blocks, computed like an all-pairs block (Gram
    matrices for the attended vectors' norms) and differentiated like one: the pairs are re-scored
    with autograd from the kept S, and the products (S = W R^T, the Grams, the norms) are
    differentiated by hand into one gradient buffer per side. Plain autograd here would run six
    batched products of tiny matrices, half with transposed operands, and sum three gradients
    into the image features."""
    return _PairedScores.apply(img, words, mask, score_pairs)


def _contexts(img, words):
    """Everything a block needs besides S, for all images and captions: norms and Grams."""
    return dict(
        word_norms=torch.linalg.vector_norm(words, dim=-1),
        region_norms=torch.linalg.vector_norm(img, dim=-1),
        img_gram=img @ img.transpose(1, 2),
        cap_gram=words @ words.transpose(1, 2),
    )


class _SparseBackwardScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, words, mask, chunks, score_chunks, score_pairs):
        fallbacks = torch.zeros((), dtype=torch.long, device=img.device)
        kept, parts = [], []
        for s, part, fell_back in score_chunks(img, words):
            parts.append(part)
            if fell_back is not None:
                fallbacks = fallbacks + fell_back
            kept.append(s)  # S of the chunk, (B_i, c, L_chunk, k)
        scores = torch.cat(parts, dim=1)[:, torch.argsort(torch.cat(chunks)).to(img.device)]
        ctx.save_for_backward(img, words, *kept)
        ctx.mask, ctx.chunks, ctx.score_pairs = mask, chunks, score_pairs
        # the backward re-scores pairs as the forward scored them: under the same autocast
        kind = img.device.type
        ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        ctx.mark_non_differentiable(fallbacks)
        return scores, fallbacks

    @staticmethod
    @once_differentiable  # hand-differentiated products: no second derivative
    def backward(ctx, grad_scores, _):
        img, words, *kept = ctx.saved_tensors
        device, (kind, dtype, enabled) = img.device, ctx.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled):
            c = _contexts(img, words)
        grad_w, grad_r = torch.zeros_like(words), torch.zeros_like(img)
        grads = {}  # gradients of the contexts some pair uses (filled in by _pair_gradients)
        chunk_of, position = _caption_positions(ctx.chunks, words.shape[0])
        pairs = grad_scores.nonzero().cpu()  # (P, 2): image, caption
        for index, s in enumerate(kept):
            selected = pairs[chunk_of[pairs[:, 1]] == index]
            for start in range(0, len(selected), PAIRS_PER_PASS):
                i, j = selected[start : start + PAIRS_PER_PASS].to(device).unbind(1)
                with torch.autocast(kind, dtype=dtype, enabled=enabled):
                    _pair_gradients(
                        ctx.score_pairs,
                        s,
                        position.to(device)[j],
                        i,
                        j,
                        grad_scores[i, j],
                        c,
                        ctx.mask,
                        img,
                        words,
                        grad_w,
                        grad_r,
                        grads,
                    )
        grad_r, grad_w = _through_contexts(img, words, c, grads, grad_w, grad_r)
        return grad_r, grad_w, None, None, None, None


CONTEXTS = ("word_norms", "region_norms", "img_gram", "cap_gram")


class _PairedScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, img, words, mask, score_pairs):
        c = _contexts(img, words)
        s = words @ img.transpose(1, 2)  # (B, L, k)
        scores, fallbacks = score_pairs(s=s, word_mask=mask, **c)
        if fallbacks is None:
            fallbacks = torch.zeros((), dtype=torch.long, device=img.device)
        ctx.save_for_backward(img, words, s, *(c[name] for name in CONTEXTS))
        ctx.mask, ctx.score_pairs = mask, score_pairs
        kind = img.device.type
        ctx.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        ctx.mark_non_differentiable(fallbacks)
        return scores, fallbacks

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores, _):
        img, words, s, *kept = ctx.saved_tensors
        kind, dtype, enabled = ctx.autocast
        c = dict(zip(CONTEXTS, kept))
        with torch.autocast(kind, dtype=dtype, enabled=enabled), torch.enable_grad():
            leaves = {
                "s": s.detach().requires_grad_(),
                **{n: t.detach().requires_grad_() for n, t in c.items()},
            }
            names = list(leaves)
            scores = ctx.score_pairs(word_mask=ctx.mask, **leaves)[0]
            found = dict(
                zip(
                    names,
                    torch.autograd.grad(scores, [leaves[n] for n in names], grad_scores, allow_unused=True),
                )
            )
        ds = found.pop("s")
        with torch.autocast(kind, enabled=False):  # the features' own precision
            if ds is None:
                grad_w, grad_r = torch.zeros_like(words), torch.zeros_like(img)
            else:  # S_b = W_b R_b^T: dW_b = dS_b R_b, dR_b = dS_b^T W_b
                ds = ds.to(torch.promote_types(img.dtype, words.dtype))
                grad_w = (ds @ img.to(ds.dtype)).to(words.dtype)
                grad_r = (ds.transpose(1, 2) @ words.to(ds.dtype)).to(img.dtype)
            grads = {n: found[n] for n in CONTEXTS if found[n] is not None}
            grad_r, grad_w = _through_contexts(img, words, c, grads, grad_w, grad_r)
        return grad_r, grad_w, None, None


def _caption_positions(chunks, n_cap):
    """(chunk index, position in chunk) of every caption."""
    chunk, position = torch.empty(n_cap, dtype=torch.long), torch.empty(n_cap, dtype=torch.long)
    for index, rows in enumerate(chunks):
        chunk[rows] = index
        position[rows] = torch.arange(len(rows))
    return chunk, position


def _index_add(target, index, values):
    """target[index[p]] += values[p] along dim 0; target may be a strided view (index_add_ on
    one would take a slow path)."""
    if target.is_contiguous():
        target.index_add_(0, index, values)
    else:
        target += torch.zeros_like(target).index_add_(0, index, values)


def _pair_gradients(score_pairs, s, positions, i, j, grad, c, mask, img, words, grad_w, grad_r, grads):
    """Re-score pairs (i, j) from the kept chunk `s` with autograd and add their gradients."""
    longest = s.shape[2]
    rows = dict(word_norms=j, cap_gram=j, region_norms=i, img_gram=i)
    cut = dict(
        word_norms=lambda t: t[:, :longest],
        cap_gram=lambda t: t[:, :longest, :longest],
        region_norms=lambda t: t,
        img_gram=lambda t: t,
    )
    leaves = {"s": s[i, positions], **{name: cut[name](c[name])[rows[name]] for name in rows}}
    with torch.enable_grad():
        leaves = {name: t.detach().requires_grad_() for name, t in leaves.items()}
        names = list(leaves)
        scores = score_pairs(word_mask=mask[j, :longest], **leaves)[0]
        found = dict(
            zip(names, torch.autograd.grad(scores, [leaves[n] for n in names], grad, allow_unused=True))
        )
    ds = found.pop("s")
    if ds is not None:  # S_ij = W_j R_i^T: dW_j += dS_ij R_i, dR_i += dS_ij^T W_j
        with torch.autocast(img.device.type, enabled=False):  # the features' own precision
            dtype = torch.promote_types(img.dtype, words.dtype)  # (they differ under autocast)
            ds, r, w = ds.to(dtype), img[i].to(dtype), words[j, :longest].to(dtype)
            _index_add(grad_w[:, :longest], j, (ds @ r).to(words.dtype))
            _index_add(grad_r, i, (ds.transpose(1, 2) @ w).to(img.dtype))
    for name, g in found.items():
        if g is not None:
            if name not in grads:
                grads[name] = torch.zeros_like(c[name])
            _index_add(cut[name](grads[name]), rows[name], g)


def _through_contexts(img, words, c, grads, grad_w, grad_r):
    """Gradients of img and words: the S products' parts plus those through norms and Grams."""
    # in each side's own dtype (under autocast the Grams may be bf16, the features not)
    side = dict(word_norms=words, cap_gram=words, region_norms=img, img_gram=img)
    grads = {name: g.to(side[name].dtype) for name, g in grads.items()}
    c = {name: value.to(side[name].dtype) for name, value in c.items()}
    # in place: grad_w and grad_r are this backward's own buffers, each a pass over the features
    # a context no pair's score used (the region norms and caption Grams of t2i, say) has no
    # entry in `grads`: its terms would add zeros at the cost of a pass over the features
    if "word_norms" in grads:
        grad_w.addcmul_(_norm_grad_scale(c["word_norms"], grads["word_norms"]).unsqueeze(-1), words)
    if "region_norms" in grads:
        grad_r.addcmul_(_norm_grad_scale(c["region_norms"], grads["region_norms"]).unsqueeze(-1), img)
    # G = X X^T: dX = (dG + dG^T) X
    if "img_gram" in grads:
        grad_r.baddbmm_(grads["img_gram"] + grads["img_gram"].transpose(1, 2), img)
    if "cap_gram" in grads:
        grad_w.baddbmm_(grads["cap_gram"] + grads["cap_gram"].transpose(1, 2), words)
    return grad_r, grad_w


def _norm_grad_scale(norms, grad_norms):
    """||x||'s backward is s x with s = g / ||x||, and s = 0 at a zero vector (as torch's)."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, grad_norms / safe, torch.zeros_like(norms))
