"""Encode a split with a trained model, in eval mode, block by block and in dataset order.

Images are encoded once each (one row per image), captions once each; batch order and size do not
change the results (BatchNorm uses running statistics in eval mode).
"""
import numpy as np
import torch

from pipeline_steps.common.batches import pad_captions


@torch.no_grad()
def iter_image_embeddings(model, features, batch_size, device):
    """Yield (start, (b, d) float32 numpy) blocks of image embeddings, in image order."""
    model.eval()
    for start in range(0, len(features), batch_size):
        ids = np.arange(start, min(start + batch_size, len(features)))
        images = torch.from_numpy(features.rows(ids)).to(device)
        yield start, model.encode_images(images).float().cpu().numpy()


@torch.no_grad()
def iter_caption_embeddings(model, captions, n_captions, batch_size, device):
    """Yield (start, (b, d) float32 numpy) blocks of caption embeddings, in caption order."""
    model.eval()
    for start in range(0, n_captions, batch_size):
        stop = min(start + batch_size, n_captions)
        ids, lengths = pad_captions([captions.with_boundaries(c) for c in range(start, stop)])
        yield start, model.encode_captions(ids.to(device), lengths).float().cpu().numpy()


def encode_split(model, features, captions, n_captions, batch_size, device):
    """Whole-split embeddings in memory: (images (N_img, d), captions (N_cap, d)) float32.

    For evaluation splits (at most 5,000 images); the training split goes through
    `iter_*_embeddings` into HDF5 instead.
    """
    images = np.concatenate([b for _, b in iter_image_embeddings(model, features, batch_size, device)])
    caps = np.concatenate([b for _, b in iter_caption_embeddings(model, captions, n_captions,
                                                                   batch_size, device)])
    return images, caps
