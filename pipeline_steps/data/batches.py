"""Training batches: caption items, memory-mapped image rows, cached ids, offline AOQ negatives.

Items are captions (docs/data.md): caption c pairs with image c // 5. An epoch's order and every
random draw derive from (seed, epoch, batch number), so a run is reproducible and a resumed run
sees exactly the batches it would have seen (DataLoader workers included). In a multi-process
run every process builds the same batches and keeps its contiguous shard of each (`shard_bounds`);
offline negatives are drawn for the whole batch before slicing, so every anchor gets the negatives
the single-process run would have drawn.
"""

import numpy as np
import torch

from pipeline_steps.common.npy import open_npy
from pipeline_steps.data.candidates import checked_candidates
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE


def epoch_batches(n_items, batch_size, seed, epoch):
    """The epoch's shuffled items cut into batches (the last one may be smaller; drop_last=False)."""
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    return [order[i : i + batch_size] for i in range(0, n_items, batch_size)]


def shard_bounds(n_items, rank, world_size):
    """Rows [start, stop) of a batch of n_items that process `rank` of `world_size` takes:
    contiguous, in rank order, sizes differing by at most one (rank * n / W when W divides n)."""
    return n_items * rank // world_size, n_items * (rank + 1) // world_size


def pad_captions(id_lists):
    """List of 1-D id arrays -> (ids (B, L_max) int64 zero-padded, lengths (B,) int64)."""
    lengths = torch.tensor([len(x) for x in id_lists], dtype=torch.int64)
    ids = torch.zeros(len(id_lists), int(lengths.max()), dtype=torch.int64)
    for row, seq in enumerate(id_lists):
        ids[row, : len(seq)] = torch.from_numpy(seq)
    return ids, lengths


class OfflineCandidates:
    """i2t (N_img, K_i2t) caption ids and t2i (N_cap, K_t2i) image ids, memory-mapped.

    Pickled (DataLoader workers started by spawn/forkserver) as the two paths: each worker maps
    the files itself instead of receiving a copy of their contents (1.8 GB for COCO).
    """

    def __init__(self, i2t_path, t2i_path, n_images, offline_size):
        # The columns drawn from are checked first, as adopt_candidates checks them: an id out
        # of range is refused (a negative one would silently count from the end); own positives
        # are counted and logged.
        self.paths = (i2t_path, t2i_path)
        self.i2t = checked_candidates(i2t_path, "i2t", n_images, offline_size, own_positives="warn")
        self.t2i = checked_candidates(t2i_path, "t2i", n_images, offline_size, own_positives="warn")
        self.offline_size = offline_size

    def __getstate__(self):
        return {"paths": self.paths, "offline_size": self.offline_size}

    def __setstate__(self, state):
        self.paths, self.offline_size = state["paths"], state["offline_size"]
        self.i2t, self.t2i = (open_npy(path) for path in self.paths)

    def sample(self, captions, rng):
        """Offline negatives of anchor captions (docs/method.md): returns (T3, I3, T4, I4) id arrays.

        One draw n serves both directions: T3 is the n-th i2t candidate of the anchor image and
        I3 the (n // 5)-th t2i candidate of the anchor caption; T4 is a random caption of I3
        and I4 the image of T3.
        """
        captions = np.asarray(captions, dtype=np.int64)
        n = rng.integers(0, self.offline_size, size=len(captions))
        n2 = rng.integers(0, CAPTIONS_PER_IMAGE, size=len(captions))
        t3 = self.i2t[captions // CAPTIONS_PER_IMAGE, n].astype(np.int64)
        i3 = self.t2i[captions, n // CAPTIONS_PER_IMAGE].astype(np.int64)
        t4 = CAPTIONS_PER_IMAGE * i3 + n2
        i4 = t3 // CAPTIONS_PER_IMAGE
        return t3, i3, t4, i4


class TrainBatches(torch.utils.data.Dataset):
    """Dataset whose item b is batch b of one epoch (one memmap read per batch), or with
    shard=(rank, world_size) that process's rows of it (`shard_bounds`)."""

    def __init__(
        self,
        features,
        captions,
        batches,
        seed,
        epoch,
        candidates=None,
        first_batch=0,
        caption_targets=None,
        shard=(0, 1),
    ):
        self.features, self.captions, self.candidates = features, captions, candidates
        self.batches, self.seed, self.epoch, self.first_batch = batches, seed, epoch, first_batch
        # word ids -> (labels, mask) of a captioning branch (VSRN); built for anchors only.
        self.caption_targets = caption_targets
        self.shard = shard

    def __len__(self):
        return len(self.batches) - self.first_batch

    def _caption_batch(self, caption_ids):
        return pad_captions([self.captions.with_boundaries(c) for c in caption_ids])

    def __getitem__(self, position):
        number = self.first_batch + position
        whole = self.batches[number]
        start, stop = shard_bounds(len(whole), *self.shard)
        items = whole[start:stop]
        ids, lengths = self._caption_batch(items)
        batch = {
            "index": torch.from_numpy(items.astype(np.int64)),
            "images": torch.from_numpy(self.features.rows(items // CAPTIONS_PER_IMAGE)),
            "ids": ids,
            "lengths": lengths,
        }
        if self.caption_targets is not None:
            labels, masks = zip(*(self.caption_targets(self.captions.tokens(c)) for c in items))
            batch["cap_labels"] = torch.from_numpy(np.stack(labels))  # (B, max_len + 1)
            batch["cap_masks"] = torch.from_numpy(np.stack(masks))
        if self.candidates is not None:
            rng = np.random.default_rng([self.seed, self.epoch, number])
            # drawn for the whole batch, then sliced: the same draws whatever the shard
            t3, i3, t4, i4 = (a[start:stop] for a in self.candidates.sample(whole, rng))
            batch["neg_images"] = torch.from_numpy(self.features.rows(i3))  # I3
            batch["neg_ids"], batch["neg_lengths"] = self._caption_batch(t3)  # T3
            batch["pos2_images"] = torch.from_numpy(self.features.rows(i4))  # I4
            batch["pos2_ids"], batch["pos2_lengths"] = self._caption_batch(t4)  # T4
        return batch
