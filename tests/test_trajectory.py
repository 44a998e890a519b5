"""Five AOQ training steps of the real trainer (training_loss, Optimizers with the release's Adam,
clipping) against an independent step written from docs/method.md, for VSRN in the COCO and the
Flickr30K layout, in float64: after each step the loss and every parameter and buffer (BatchNorm
running statistics included) must agree. The tolerance (1e-8 relative, 1e-10 absolute) is set by
the Rs_GCN biases that feed a BatchNorm: their true gradient is 0, their computed one rounding
noise of about 1e-17, which Adam turns into steps of about 1e-11 that differ between the two
orders of summation. Today's Adam in place of the release's fails at the first step.

The independent step uses the model's modules only for their forward maps (the encoders and the
captioning decoder); everything a training step adds is written out here: the three train-mode
passes in order (anchor, I3/T3, I4/T4), every loss term and the adaptive weights, the captioning
loss over all steps, clipping that counts each captioning parameter twice, and PyTorch 0.4.1's
Adam stepped twice for the captioning parameters.
"""

import copy
import json
import math

import numpy as np
import pytest
import torch

from models import create_model
from models.losses import LossConfig
from pipeline_steps import train
from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches
from pipeline_steps.data.splits import open_split
from pipeline_steps.training.optim import Optimizers

LR, CLIP, STEPS, BATCH = 2e-3, 2.0, 5, 16
ALPHA, BETA, M_ON, M_OFF = 0.3, 1.5, 0.2, 0.0


def vsrn(vocab, img_dim, f30k):
    torch.manual_seed(0)
    config = dict(embed_size=16, word_dim=8, dim_hidden=8, dim_word=8, max_len=12, f30k_layout=f30k)
    return create_model("vsrn", vocab_size=vocab, img_dim=img_dim, **config).to(torch.float64)


def as_float64(batch):
    return {
        k: v.to(torch.float64) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in batch.items()
    }


def hinge(x):
    return torch.clamp(x, min=0)


def reference_loss(model, batch):
    """docs/method.md sections 2-4 and 8, written out."""
    v, regions = model.img_enc(batch["images"])  # anchor pass: I1, then T1, then the captioning loss
    u = model.txt_enc(batch["ids"], batch["lengths"])
    labels, masks = batch["cap_labels"], batch["cap_masks"]
    steps = labels.shape[1] - 2  # t = 0 .. max_len - 2, each predicting labels[:, t + 1]
    logits = model.caption_model(regions, labels, steps)  # (B, steps, V)
    log_p = torch.log_softmax(logits, dim=2).gather(2, labels[:, 1 : steps + 1, None]).squeeze(2)
    caption = -(log_p * masks[:, 1 : steps + 1]).sum() / len(labels)
    v3 = model.img_enc(batch["neg_images"])[0]  # offline passes, in order: I3, T3, I4, T4
    u3 = model.txt_enc(batch["neg_ids"], batch["neg_lengths"])
    v4 = model.img_enc(batch["pos2_images"])[0]
    u4 = model.txt_enc(batch["pos2_ids"], batch["pos2_lengths"])
    scores = v @ u.T  # cosine: both are unit vectors
    pos = scores.diagonal()
    b = len(pos)
    off_t, off_i = (v * u3).sum(1), (v3 * u).sum(1)
    quin_a, quin_b = (v3 * u3).sum(1), (v4 * u4).sum(1)
    terms = []
    for k in range(b):
        row = [scores[k, j] for j in range(b) if j != k]
        col = [scores[i, k] for i in range(b) if i != k]
        on_t, on_i = torch.stack(row).max(), torch.stack(col).max()
        w_t = BETA - (off_t[k] - on_t) / ALPHA  # not detached, not clamped
        w_i = BETA - (off_i[k] - on_i) / ALPHA
        terms.append(
            w_t * hinge(M_ON + on_t - pos[k])
            + w_i * hinge(M_ON + on_i - pos[k])
            + hinge(M_OFF + off_t[k] - pos[k])
            + hinge(M_OFF + off_i[k] - pos[k])
            + hinge(M_OFF + quin_a[k] - pos[k])
            + hinge(M_OFF + quin_b[k] - pos[k])
        )
    return torch.stack(terms).sum() + caption


class ReferenceAdam:
    """PyTorch 0.4.1's Adam, per tensor, as docs/method.md writes it."""

    def __init__(self, params, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.state = {p: [0, torch.zeros_like(p), torch.zeros_like(p)] for p in params}

    @torch.no_grad()
    def step(self, p):
        state = self.state[p]
        state[0] += 1
        t, m, v = state
        m.mul_(self.b1).add_((1 - self.b1) * p.grad)
        v.mul_(self.b2).add_((1 - self.b2) * p.grad * p.grad)
        p -= self.lr * math.sqrt(1 - self.b2**t) / (1 - self.b1**t) * m / (v.sqrt() + self.eps)


def reference_update(model, adam):
    """Clip as a parameter list naming each captioning parameter twice, then one Adam step for
    the retrieval parameters and two for the captioning ones."""
    retrieval = list(model.txt_enc.parameters()) + list(model.img_enc.parameters())
    caption = list(model.caption_model.parameters())
    with torch.no_grad():
        total = math.sqrt(
            sum(float((p.grad**2).sum()) for p in retrieval)
            + 2 * sum(float((p.grad**2).sum()) for p in caption)
        )
        coef = CLIP / (total + 1e-6)
        if coef < 1:
            for p in retrieval:
                p.grad *= coef
            for p in caption:
                p.grad *= coef * coef
    for p in retrieval:
        adam.step(p)
    for p in caption:
        adam.step(p)
        adam.step(p)


def batches(train_data, model, offline_size=20):
    features, captions, info = open_split(train_data["data"], train_data["prepared"], "train")
    candidates = OfflineCandidates(train_data["i2t"], train_data["t2i"], info.n_images, offline_size)
    order = epoch_batches(info.n_captions, BATCH, 7, 0)
    dataset = TrainBatches(
        features, captions, order, 7, 0, candidates, caption_targets=model.caption_targets_of
    )
    assert info.img_dim == 16
    return [as_float64(dataset[i]) for i in range(STEPS)]


@pytest.mark.parametrize("f30k", [False, True], ids=["coco layout", "f30k layout"])
def test_five_aoq_steps_match_the_method_written_out(train_data, f30k):
    vocab = json.loads((train_data["prepared"] / "manifest.json").read_text())["vocab_size"]
    ours = vsrn(vocab, 16, f30k)
    data = batches(train_data, ours)
    theirs = copy.deepcopy(ours)
    assert any("running_mean" in name for name, _ in ours.named_buffers())
    optimizer = Optimizers(ours, LR, release_adam=True)
    adam = ReferenceAdam(list(theirs.parameters()), LR)
    loss_cfg = LossConfig(
        variant="adapoffquin", margin_online=M_ON, margin_offline=M_OFF, alpha=ALPHA, beta=BETA
    )
    ours.train(), theirs.train()
    for step, batch in enumerate(data):
        torch.manual_seed(100 + step)  # the same dropout masks in the captioning branch
        loss, _ = train.training_loss(ours, batch, loss_cfg, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.clip(CLIP)
        optimizer.step()

        torch.manual_seed(100 + step)
        expected = reference_loss(theirs, batch)
        theirs.zero_grad(set_to_none=True)
        expected.backward()
        reference_update(theirs, adam)

        assert loss.item() == pytest.approx(expected.item(), rel=1e-10), step
        mine, ref = ours.state_dict(), theirs.state_dict()
        assert mine.keys() == ref.keys()
        for name in mine:
            torch.testing.assert_close(
                mine[name],
                ref[name],
                rtol=1e-8,
                atol=1e-10,
                msg=lambda m, at=f"step {step}: {name}": f"{at}: {m}",
            )


def test_the_reference_step_would_see_a_different_adam():
    """The comparison above can fail: today's Adam moves a parameter differently in the first
    steps (eps added after the bias correction), by more than the test's tolerance."""
    g = torch.Generator().manual_seed(0)
    p_ref = torch.randn(50, dtype=torch.float64, generator=g)
    grads = [torch.randn(50, dtype=torch.float64, generator=g) * 1e-7 for _ in range(3)]
    p_mod = p_ref.clone().requires_grad_(True)
    p_ref.requires_grad_(True)
    adam, modern = ReferenceAdam([p_ref], LR), torch.optim.Adam([p_mod], lr=LR)
    for grad in grads:
        p_ref.grad, p_mod.grad = grad.clone(), grad.clone()
        adam.step(p_ref)
        modern.step()
    assert not np.allclose(p_ref.detach().numpy(), p_mod.detach().numpy(), rtol=1e-8, atol=1e-10)
