"""Encode a split with a trained model, in eval mode, block by block and in dataset order.

Images are encoded once each (one row per image), captions once each; batch order and size do not
change the results (BatchNorm uses running statistics in eval mode). Representations are whatever
the model produces: embeddings for single-vector models, region / word features for
cross-attention models; scorers.py's `representation_scorer` scores them block by block.
"""

import numpy as np
import torch

from pipeline_steps.data.batches import pad_captions


@torch.no_grad()
def iter_image_representations(model, features, batch_size, device):
    """Yield (start, representation) blocks of images, in image order."""
    model.eval()
    for start in range(0, len(features), batch_size):
        ids = np.arange(start, min(start + batch_size, len(features)))
        yield start, model.encode_images(torch.from_numpy(features.rows(ids)).to(device))


@torch.no_grad()
def iter_caption_representations(model, captions, n_captions, batch_size, device):
    """Yield (start, representation) blocks of captions, in caption order."""
    model.eval()
    for start in range(0, n_captions, batch_size):
        stop = min(start + batch_size, n_captions)
        ids, lengths = pad_captions([captions.with_boundaries(c) for c in range(start, stop)])
        yield start, model.encode_captions(ids.to(device), lengths)


def encode_split(model, features, captions, n_captions, batch_size, device):
    """Whole-split representations in memory: (images, captions) as the model makes them.

    For evaluation splits (at most 5,000 images); the training split goes through
    `iter_*_representations` into HDF5 instead.
    """
    images = model.concat_representations(
        [r for _, r in iter_image_representations(model, features, batch_size, device)]
    )
    caps = model.concat_representations(
        [r for _, r in iter_caption_representations(model, captions, n_captions, batch_size, device)]
    )
    return images, caps
