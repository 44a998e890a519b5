"""Scorers: block views of an image x caption score matrix, for any model.

A `Scorer` scores rectangles of the n_img x 5 n_img matrix (caption c belongs to image c // 5):
`scorer(img_start, img_stop, cap_start, cap_stop)` -> float tensor (img_stop - img_start,
cap_stop - cap_start), higher = more similar. The metrics (metrics.py) ask for blocks and never
hold the whole matrix. Scorers exist for embeddings (dot products), for an ensemble (the mean of
its members' blocks) and for any model's representations (its `score_all`).
"""

import numpy as np
import torch

from models.base import MatchingModel
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE


class Scorer:
    """`n_img` images and their captions, scored block by block with `score_block`."""

    def __init__(self, n_img, score_block):
        self.n_img, self.score_block = int(n_img), score_block

    def __call__(self, img_start, img_stop, cap_start, cap_stop):
        return self.score_block(img_start, img_stop, cap_start, cap_stop)

    def fold(self, img_offset, n_img):
        """The scorer of images [img_offset, img_offset + n_img) and their captions alone."""
        cap_offset = CAPTIONS_PER_IMAGE * img_offset
        return Scorer(
            n_img,
            lambda i0, i1, c0, c1: self.score_block(
                img_offset + i0, img_offset + i1, cap_offset + c0, cap_offset + c1
            ),
        )


def _to_float_tensor(x, device):
    """numpy array or torch tensor -> detached float32 tensor on `device`."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    return t.to(device=device, dtype=torch.float32)


class _Reused:
    """One float32 buffer handed out as (rows, cols) blocks: allocating a fresh block of tens of
    MiB per call would cost page faults on every block (a third of a 5,000 x 25,000 GEMM)."""

    def __init__(self, device):
        self.device, self.flat = device, None

    def block(self, rows, cols):
        if self.flat is None or self.flat.numel() < rows * cols:
            self.flat = torch.empty(rows * cols, dtype=torch.float32, device=self.device)
        return self.flat[: rows * cols].view(rows, cols)


def embedding_scorer(img_emb, cap_emb, device="cpu"):
    """Scorer of the dot products of image and caption embeddings.

    img_emb: (N_img, d), cap_emb: (N_cap, d), numpy arrays or torch tensors; both are kept whole
    on `device` as float32 (eval sets are small: COCO 5K is 5,000 + 25,000 vectors).
    Normalise the embeddings beforehand if cosine similarity is wanted. Each returned block lives
    in a buffer reused by the next call: use it (or copy it) before asking for the next one.
    Raises ValueError unless both are 2-D with the same d and N_cap == 5 * N_img.
    """
    img = _to_float_tensor(img_emb, device)  # (N_img, d)
    cap = _to_float_tensor(cap_emb, device)  # (N_cap, d)
    if img.ndim != 2 or cap.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shapes {tuple(img.shape)} and {tuple(cap.shape)}")
    if img.shape[1] != cap.shape[1]:
        raise ValueError(f"embedding dims differ: images d={img.shape[1]}, captions d={cap.shape[1]}")
    if cap.shape[0] != CAPTIONS_PER_IMAGE * img.shape[0]:
        raise ValueError(
            f"expected {CAPTIONS_PER_IMAGE} captions per image: got {cap.shape[0]} captions "
            f"for {img.shape[0]} images"
        )
    buffer = _Reused(img.device)

    def score_block(img_start, img_stop, cap_start, cap_stop):
        out = buffer.block(img_stop - img_start, cap_stop - cap_start)
        return torch.matmul(img[img_start:img_stop], cap[cap_start:cap_stop].T, out=out)

    return Scorer(img.shape[0], score_block)


def ensemble_scorer(scorers):
    """Scorer of the mean of the given scorers' blocks (an ensemble of K models).

    Blocks are summed in float32 in the given order, then divided by K (into a reused buffer,
    valid until the next call). Raises ValueError for an empty list or members that score
    different numbers of images.
    """
    scorers = list(scorers)
    if not scorers:
        raise ValueError("ensemble_scorer needs at least one scorer")
    sizes = {s.n_img for s in scorers}
    if len(sizes) > 1:
        raise ValueError(f"ensemble members score different numbers of images: {sorted(sizes)}")
    buffer = {}

    def score_block(img_start, img_stop, cap_start, cap_stop):
        total = None
        for s in scorers:
            block = s(img_start, img_stop, cap_start, cap_stop)  # (B_img, B_cap)
            if total is None:
                if block.device not in buffer:
                    buffer[block.device] = _Reused(block.device)
                total = buffer[block.device].block(*block.shape)
                total.copy_(block)
            else:
                total.add_(block.to(torch.float32))
        return total.div_(len(scorers))

    return Scorer(sizes.pop(), score_block)


def representation_scorer(model, images, captions, n_images):
    """Scorer over a model's representations of a whole split (retrieval/encode.py).

    Models scoring by dot product (MatchingModel.score_all not overridden: VSE++, VSRN) get the
    plain embedding scorer, whose blocks reuse one buffer.
    """
    if type(model).score_all is MatchingModel.score_all:
        return embedding_scorer(images, captions, device=images.device)

    @torch.no_grad()
    def score_block(img_start, img_stop, cap_start, cap_stop):
        img = model.slice_representation(images, img_start, img_stop)
        cap = model.slice_representation(captions, cap_start, cap_stop)
        return model.score_all(img, cap).float()  # (B_img, B_cap)

    return Scorer(n_images, score_block)
