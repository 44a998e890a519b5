"""The interface every matching model shares, so training, mining and evaluation are model-agnostic.

A model encodes images and captions into representations and scores them:
- `score_all(img, cap)` -> (B_img, B_cap): every image against every caption (the loss's matrix);
- `score_paired(img, cap)` -> (B,): image b against caption b only (the offline AOQ pairs).
Single-vector models (VSE++, VSRN) score with dot products of l2-normalised embeddings and can be
used for offline mining (`single_vector = True`). Cross-attention models (SCAN, BFAN) keep region
and word features and only provide scores; the loss never sees anything but scores.

Representations may be tensors or tuples of tensors (e.g. padded word features and lengths);
`concat_representations` and `slice_representation` let evaluation store a whole split and score
it block by block without knowing their structure.
"""

import contextlib

import torch
from torch import nn


def l2norm(x, dim=-1):
    """x / ||x|| along `dim`. No epsilon inside the norm, as in VSE++; all-zero rows stay zero."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class MatchingModel(nn.Module):
    name = None
    config_class = None
    single_vector = True
    # True for models whose training batches must carry captioning labels and masks (VSRN).
    needs_caption_targets = False

    def encode_images(self, images):
        """images (B, 36, D) float -> image representation."""
        raise NotImplementedError

    def encode_captions(self, ids, lengths):
        """ids (B, L) int64 padded with 0, lengths (B,) int64 -> caption representation."""
        raise NotImplementedError

    def score_all(self, img, cap):
        """(B_img, B_cap) scores of every image against every caption."""
        return img @ cap.t()

    def score_paired(self, img, cap):
        """(B,) scores of image b against caption b."""
        return (img * cap).sum(dim=-1)

    def training_scores(self, img, cap, few_gradients):
        """score_all for the loss. few_gradients: the loss gives a gradient to a few entries per
        row and column only (hardest negatives), so a model whose every score is a pair
        computation may skip the others in its backward (accel/pairs.py)."""
        return self.score_all(img, cap)

    def anchor_forward(self, batch, device):
        """Training pass over the anchor batch: (image repr, caption repr, auxiliary loss or None).

        VSRN overrides this to add its captioning loss, which needs the anchor's region features.
        """
        img = self.encode_images(batch["images"].to(device))
        cap = self.encode_captions(batch["ids"].to(device), batch["lengths"])
        return img, cap, None

    def caption_targets_of(self, token_ids):
        """(labels, mask) numpy arrays of a caption's word ids; only if needs_caption_targets."""
        raise NotImplementedError(f"{self.name} has no captioning branch")

    def offline_pass(self):
        """Context for the AOQ passes over the offline pairs (a model may freeze BN statistics)."""
        return contextlib.nullcontext()

    def parameter_groups(self):
        """Named parameter lists; the trainer may treat groups differently (`adam_steps`)."""
        return {"main": list(self.parameters())}

    def adam_steps(self):
        """{group: Adam steps per iteration} for groups that take more than one (VSRN's doubled
        captioning update); every other parameter takes one."""
        return {}

    @staticmethod
    def concat_representations(reps):
        """Join representations of consecutive batches (tensors along dim 0)."""
        return torch.cat(reps)

    @staticmethod
    def slice_representation(rep, start, stop):
        return rep[start:stop]

    @property
    def config_dict(self):
        return dict(self.config.__dict__)
