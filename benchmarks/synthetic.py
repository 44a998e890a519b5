"""Synthetic embeddings shared by the mining and evaluation benchmarks."""

import numpy as np

CAPS = 5


def paired_embeddings(n_img, d, image_weight, seed=0):
    """Unit-norm float32 images (n_img, d) and captions (5 n_img, d); caption c is
    image_weight * its image + Gaussian noise, so positives score higher than chance."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, d), dtype=np.float32)
    cap = np.repeat(img, CAPS, axis=0) * image_weight + rng.standard_normal(
        (CAPS * n_img, d), dtype=np.float32
    )
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    return img, cap
