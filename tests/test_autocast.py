"""Every model trains under bf16 autocast with the losses in float32 (the `amp: bf16` option).

CPU autocast runs here; the CUDA variant runs where a GPU is present."""

import numpy as np
import pytest
import torch

import models
from models.caption_branch import masked_caption_nll
from models.losses import LossConfig, OfflineScores, retrieval_loss
from tests.helpers import random_caption_batch, random_images

VOCAB, IMG_DIM = 40, 24
CONFIGS = {
    "vsepp": dict(embed_size=16, word_dim=8),
    "vsrn": dict(embed_size=16, word_dim=8, dim_hidden=8, dim_word=6, max_len=12),
    "scan": dict(embed_size=16, word_dim=8),
    "bfan": dict(embed_size=16, word_dim=8),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def batch_for(model, batch=6):
    batch_dict = {}
    for prefix, seed in (("", 1), ("neg_", 3), ("pos2_", 5)):
        ids, lengths = random_caption_batch(VOCAB, seed=seed, batch=batch)
        ids[:, 0] = 1
        batch_dict[prefix + "images"] = random_images(IMG_DIM, seed=seed + 1, batch=batch)
        batch_dict[prefix + "ids"], batch_dict[prefix + "lengths"] = ids, lengths
    if model.needs_caption_targets:
        rows = [batch_dict["ids"][b, 1 : int(n) - 1].numpy() for b, n in enumerate(batch_dict["lengths"])]
        labels, masks = zip(*(model.caption_targets_of(r) for r in rows))
        batch_dict["cap_labels"] = torch.from_numpy(np.stack(labels))
        batch_dict["cap_masks"] = torch.from_numpy(np.stack(masks))
    return batch_dict


def aoq_loss(model, batch, device):
    """The training loss as pipeline_steps.training.step.training_loss computes it (single process)."""
    img, cap, aux = model.anchor_forward(batch, device)
    img3 = model.encode_images(batch["neg_images"].to(device))
    cap3 = model.encode_captions(batch["neg_ids"].to(device), batch["neg_lengths"])
    img4 = model.encode_images(batch["pos2_images"].to(device))
    cap4 = model.encode_captions(batch["pos2_ids"].to(device), batch["pos2_lengths"])
    offline = OfflineScores(
        model.score_paired(img, cap3),
        model.score_paired(img3, cap),
        model.score_paired(img3, cap3),
        model.score_paired(img4, cap4),
    )
    loss, _ = retrieval_loss(model.score_all(img, cap), offline, LossConfig(variant="adapoffquin"))
    return loss if aux is None else loss + aux


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_autocast_step_is_float32_and_close(name, device):
    torch.manual_seed(0)
    model = models.create_model(name, vocab_size=VOCAB, img_dim=IMG_DIM, **CONFIGS[name]).to(device)
    model.eval()  # no dropout: both passes see the same computation
    batch = batch_for(model)
    with torch.no_grad():
        want = aoq_loss(model, batch, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        got = aoq_loss(model, batch, device)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    got.backward()
    for pname, param in model.named_parameters():
        assert param.grad is None or (
            param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all()
        ), pname


def test_losses_promote_reduced_precision_inputs():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 5, generator=g) * 2 - 1
    offline = OfflineScores(*(torch.rand(5, generator=g) for _ in range(4)))
    cfg = LossConfig(variant="adapoffquin")
    low = scores.bfloat16()
    low_offline = OfflineScores(
        *(x.bfloat16() for x in (offline.off_t, offline.off_i, offline.quin_a, offline.quin_b))
    )
    loss, terms = retrieval_loss(low, low_offline, cfg)
    upcast = OfflineScores(
        *(x.bfloat16().float() for x in (offline.off_t, offline.off_i, offline.quin_a, offline.quin_b))
    )
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert torch.equal(loss, retrieval_loss(low.float(), upcast, cfg)[0])
    logits = torch.randn(3, 4, 7, generator=g).bfloat16()
    labels = torch.randint(0, 7, (3, 6), generator=g)
    masks = torch.ones(3, 6)
    nll = masked_caption_nll(logits, labels, masks)
    assert nll.dtype == torch.float32
    assert torch.equal(nll, masked_caption_nll(logits.float(), labels, masks))
