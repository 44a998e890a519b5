"""One training step and the schedule around it (docs/method.md, "One training step" and "Training
schedule and model selection"): the loss of a batch with its forward passes in the reference's
order, the loss of each epoch (warm-up), and the learning rate of each epoch. The loop that
applies them is `train_epochs` in pipeline_steps/train.py; the optimiser is training/optim.py.
"""

import torch

from models.losses import OfflineScores, adaptive_weights, retrieval_loss
from models.variants import VARIANTS
from pipeline_steps.training import distributed


def loss_config_at_epoch(loss_cfg, cfg, epoch):
    """The loss of `epoch`: during the warm-up, summed over every negative (no hardest one)."""
    return loss_cfg if epoch >= cfg.max_violation_warmup_epochs else loss_cfg.summed_over_negatives()


def lr_at_epoch(cfg, epoch):
    return cfg.learning_rate * 0.1 ** (epoch // cfg.lr_update)


def training_loss(model, batch, loss_cfg, device, ctx=distributed.SINGLE, stats=None):
    """Loss of one batch: anchor pass, then (AOQ) the I3/T3 and I4/T4 passes in that order.

    The order matters for models with BatchNorm: each train-mode pass updates the running
    statistics, anchor first (docs/method.md). In a multi-process run `batch` is this process's shard:
    `ctx` completes the representations and offline scores with the other shards' (without their
    gradients) and the auxiliary loss, a per-sample mean, with theirs, so the loss is the whole
    batch's.

    `stats`, a dict or None, receives what the logs show besides the loss terms: the mean adaptive
    weight of an AdapOffQuin loss.
    """
    img, cap, aux = model.anchor_forward(batch, device)
    offline = None
    if loss_cfg.needs_offline:
        with model.offline_pass():
            img3 = model.encode_images(batch["neg_images"].to(device))
            cap3 = model.encode_captions(batch["neg_ids"].to(device), batch["neg_lengths"])
            img4 = model.encode_images(batch["pos2_images"].to(device))
            cap4 = model.encode_captions(batch["pos2_ids"].to(device), batch["pos2_lengths"])
        paired = dict(
            off_t=model.score_paired(img, cap3),
            off_i=model.score_paired(img3, cap),
            quin_a=model.score_paired(img3, cap3),
            quin_b=model.score_paired(img4, cap4),
        )
        offline = OfflineScores(**{name: ctx.whole_batch(score) for name, score in paired.items()})
    img = ctx.whole_batch(img, model.concat_representations)
    cap = ctx.whole_batch(cap, model.concat_representations)
    scores = model.training_scores(img, cap, few_gradients=loss_cfg.max_violation)
    loss, terms = retrieval_loss(scores, offline, loss_cfg)
    if stats is not None and VARIANTS[loss_cfg.variant].adaptive:
        with torch.no_grad():
            stats["adaptive_weight_mean"] = torch.cat(adaptive_weights(scores, offline, loss_cfg)).mean()
    if aux is not None:
        aux = ctx.batch_mean(aux, len(batch["index"]))
        loss = loss + aux
        terms["auxiliary"] = aux.detach()
    return loss, terms
