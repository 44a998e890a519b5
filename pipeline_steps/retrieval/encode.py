"""Encode a split with a trained model, in eval mode, block by block and in dataset order.

Images are encoded once each (one row per image), captions once each; batch order and size do not
change the results (BatchNorm uses running statistics in eval mode). Representations are whatever
the model produces: embeddings for single-vector models, region / word features for
cross-attention models; `representation_scorer` scores them block by block for the metrics.
"""
import numpy as np
import torch

from models.base import MatchingModel
from pipeline_steps.data.batches import pad_captions
from pipeline_steps.retrieval.metrics import embedding_scorer


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
        [r for _, r in iter_image_representations(model, features, batch_size, device)])
    caps = model.concat_representations(
        [r for _, r in iter_caption_representations(model, captions, n_captions, batch_size, device)])
    return images, caps


def representation_scorer(model, images, captions, n_images):
    """A metrics scorer (see metrics.py) over representations of a whole split.

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

    score_block.n_img = n_images
    return score_block
