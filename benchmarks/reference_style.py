"""Reference-style training steps of VSRN+AOQ, SCAN+AOQ and BFAN+AOQ, for benchmarks only.

Written from the specification and a reading of the reference code (sunnychencool/AOQ,
KunpengLi1994/VSRN, kuanghuei/SCAN), not copied. They keep the reference's *computation
structure* so a benchmark can time it against ours at the same sizes and with the same weights
(each class loads our model's `reference_state()`):

VSRN+AOQ (modelAOQ.VSRN.train_emb):
- Rs_GCN as Conv1d layers on the (B, C, N) layout, permutes as the reference;
- the text GRU sorts the batch, packs, unsorts and gathers the last state;
- three encoder passes (anchor, I3/T3, I4/T4), then the captioning loss of the anchor pass;
- the captioning decoder always runs max_len - 1 = 59 steps; its attention concatenates
  [encoder output ; repeated query] and applies linear1 to all (B x 36) 1024-vectors every step;
  log_softmax every step; NLL with the mask, summed and divided by B;
- the AOQ ContrastiveLoss on embeddings (scores - 10 * eye for the hardest negatives);
- one Adam whose parameter list names every captioning parameter twice (text encoder, image
  encoder, decoder, encoder, caption model), stepped sequentially (foreach=False) as PyTorch 0.4.1
  did, and the clip norm over the same duplicated list.
SCAN/BFAN+AOQ (AOQ's BFAN/modelAOQ.py, SCAN's model.py):
- the B x B score matrix by a Python loop over captions: caption i is repeated for every image
  and attended against all of them (xattn_score / xattn_score_t2i);
- the four offline paired scores by a Python loop over the B pairs (xattn_scoreoffline);
- Adam over the text encoder and the image fc, clip norm 2.0.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.caption_branch import Attention


# ---- shared ----------------------------------------------------------------------------------
def packed_gru(embed, rnn, ids, lengths):
    """The reference's text path: sort by length (descending), pack, run, pad, restore order."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths)[::-1].copy()
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    x = embed(ids[torch.from_numpy(order)])
    packed = pack_padded_sequence(x, lengths[order].tolist(), batch_first=True)
    out, _ = pad_packed_sequence(rnn(packed)[0], batch_first=True)
    return out[torch.from_numpy(restore)]


def aoq_loss(scores, pos, off_t, off_i, quin_a, quin_b, m_on=0.2, m_off=0.0, alpha=0.3, beta=1.5):
    """ContrastiveLoss of AOQ with max_violation (scores - 10 * eye for the online negatives)."""
    n = scores.shape[0]
    eye = torch.eye(n, device=scores.device)
    hard = scores - 10 * eye
    on_t, on_i = hard.max(1)[0], hard.max(0)[0]
    diag = scores.diag().view(n, 1)
    cost_s = (m_on + scores - diag.expand_as(scores)).clamp(min=0).masked_fill(eye > 0.5, 0).max(1)[0]
    cost_im = (m_on + scores - diag.t().expand_as(scores)).clamp(min=0).masked_fill(eye > 0.5, 0).max(0)[0]
    cost_s = cost_s * (beta - (off_t - on_t) / alpha)
    cost_im = cost_im * (beta - (off_i - on_i) / alpha)
    return (
        cost_s.sum()
        + cost_im.sum()
        + (m_off + off_t - pos).clamp(min=0).sum()
        + (m_off + off_i - pos).clamp(min=0).sum()
        + (m_off + quin_a - pos).clamp(min=0).sum()
        + (m_off + quin_b - pos).clamp(min=0).sum()
    )


# ---- VSRN ------------------------------------------------------------------------------------
def l2norm_dim1(x):
    """The VSRN reference's l2norm: over dim 1, no epsilon."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt()


class RsGCNConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.g, self.theta, self.phi = (nn.Conv1d(c, c, 1) for _ in range(3))
        self.W = nn.Sequential(nn.Conv1d(c, c, 1), nn.BatchNorm1d(c))

    def forward(self, v):  # v (B, C, N)
        g = self.g(v).permute(0, 2, 1)  # (B, N, C)
        theta = self.theta(v).permute(0, 2, 1)  # (B, N, C)
        r = torch.matmul(theta, self.phi(v)) / v.shape[2]  # (B, N, N)
        y = torch.matmul(r, g).permute(0, 2, 1).contiguous()
        return self.W(y) + v


class VSRNImage(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.f30k = cfg.f30k_layout
        self.fc = nn.Linear(cfg.img_dim, cfg.embed_size)
        self.gcn_layers = cfg.gcn_layers
        for k in range(1, cfg.gcn_layers + 1):
            setattr(self, f"Rs_GCN_{k}", RsGCNConv(cfg.embed_size))
        self.img_rnn = nn.GRU(cfg.embed_size, cfg.embed_size, 1, batch_first=True)
        if self.f30k:
            self.bn = nn.BatchNorm1d(cfg.embed_size)

    def forward(self, images):
        x = self.fc(images)
        if not self.f30k:
            x = l2norm_dim1(x)
        x = x.permute(0, 2, 1)
        for k in range(1, self.gcn_layers + 1):
            x = getattr(self, f"Rs_GCN_{k}")(x)
        regions = l2norm_dim1(x.permute(0, 2, 1))
        _, h = self.img_rnn(regions)
        h = self.bn(h[0]) if self.f30k else h[0]
        return l2norm_dim1(h), regions


class VSRNText(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim)
        self.rnn = nn.GRU(cfg.word_dim, cfg.embed_size, 1, batch_first=True)

    def forward(self, ids, lengths):
        out = packed_gru(self.embed, self.rnn, ids, lengths)
        last = (torch.as_tensor(lengths) - 1).view(-1, 1, 1).expand(-1, 1, out.shape[2])
        return l2norm_dim1(out.gather(1, last).squeeze(1))


class ConcatAttention(Attention):
    """Our Attention's parameters; the reference's computation (concatenate, then linear1)."""

    def forward(self, query, enc):
        b, n, _ = enc.shape
        pairs = torch.cat((enc, query.unsqueeze(1).repeat(1, n, 1)), 2).view(-1, 2 * self.dim)
        alpha = F.softmax(self.linear2(torch.tanh(self.linear1(pairs))).view(b, n), dim=1)
        return torch.bmm(alpha.unsqueeze(1), enc).squeeze(1)


class RegionRNN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.vid2hid = nn.Linear(cfg.embed_size, cfg.dim_hidden)
        self.input_dropout = nn.Dropout(0.2)
        self.rnn = nn.GRU(cfg.dim_hidden, cfg.dim_hidden, 1, batch_first=True)

    def forward(self, feats):
        b, n, d = feats.shape
        x = self.input_dropout(self.vid2hid(feats.reshape(-1, d))).view(b, n, -1)
        return self.rnn(x)


class FullLengthDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.max_len = cfg.max_len
        self.input_dropout = nn.Dropout(0.2)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.dim_word)
        self.attention = ConcatAttention(cfg.dim_hidden)
        self.rnn = nn.GRU(cfg.dim_hidden + cfg.dim_word, cfg.dim_hidden, 1, batch_first=True)
        self.out = nn.Linear(cfg.dim_hidden, cfg.vocab_size)

    def forward(self, enc, hidden, labels):
        emb = self.embedding(labels)
        logps = []
        for t in range(self.max_len - 1):  # always every step
            context = self.attention(hidden.squeeze(0), enc)
            step_in = self.input_dropout(torch.cat([emb[:, t], context], dim=1)).unsqueeze(1)
            out, hidden = self.rnn(step_in, hidden)
            logps.append(F.log_softmax(self.out(out.squeeze(1)), dim=1).unsqueeze(1))
        return torch.cat(logps, 1)  # (B, max_len - 1, V)


class CaptionModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.encoder, self.decoder = RegionRNN(cfg), FullLengthDecoder(cfg)

    def loss(self, regions, labels, masks):
        enc, h = self.encoder(regions)
        logp = self.decoder(enc, h, labels)
        steps = logp.shape[1]
        nll = F.nll_loss(
            logp.reshape(-1, logp.shape[2]), labels[:, 1 : steps + 1].reshape(-1), reduction="none"
        )
        return (nll * masks[:, 1 : steps + 1].reshape(-1)).sum() / logp.shape[0]


class _ReferenceStep:
    """A training step as the reference's train loop: loss, backward, clip over `params`, Adam."""

    def step(self, batch):
        """One step; returns (loss, total gradient norm over the parameter list as listed)."""
        loss = self.loss(batch)
        self.optimizer.zero_grad()
        loss.backward()
        norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return float(loss.detach()), float(norm)


class ReferenceVSRN(_ReferenceStep):
    """VSRN+AOQ training step with the reference's structure; weights from our VSRN model."""

    def __init__(self, ours, lr, grad_clip=2.0):
        cfg = ours.config
        self.img_enc, self.txt_enc, self.caption_model = VSRNImage(cfg), VSRNText(cfg), CaptionModel(cfg)
        for module, state in zip((self.img_enc, self.txt_enc, self.caption_model), ours.reference_state()):
            module.load_state_dict(state)
        self.grad_clip = grad_clip
        # text encoder, image encoder, decoder, encoder, caption model: captioning params twice
        self.params = (
            list(self.txt_enc.parameters())
            + list(self.img_enc.parameters())
            + list(self.caption_model.decoder.parameters())
            + list(self.caption_model.encoder.parameters())
            + list(self.caption_model.parameters())
        )
        # sequential Adam: a parameter listed twice gets two updates, as in PyTorch 0.4.1
        self.optimizer = torch.optim.Adam(self.params, lr=lr, foreach=False)
        for m in (self.img_enc, self.txt_enc, self.caption_model):
            m.train()

    def forward_emb(self, images, ids, lengths):
        u = self.txt_enc(ids, lengths)
        v, regions = self.img_enc(images)
        return v, u, regions

    def loss(self, batch):
        v, u, regions = self.forward_emb(batch["images"], batch["ids"], batch["lengths"])
        v3, u3, _ = self.forward_emb(batch["neg_images"], batch["neg_ids"], batch["neg_lengths"])
        v4, u4, _ = self.forward_emb(batch["pos2_images"], batch["pos2_ids"], batch["pos2_lengths"])
        caption = self.caption_model.loss(regions, batch["cap_labels"], batch["cap_masks"])
        retrieval = aoq_loss(
            v @ u.t(), (v * u).sum(1), (v * u3).sum(1), (u * v3).sum(1), (v3 * u3).sum(1), (u4 * v4).sum(1)
        )
        return retrieval + caption


# ---- SCAN / BFAN -----------------------------------------------------------------------------
def l2norm_eps(x, dim, eps=1e-8):
    """SCAN's l2norm: eps added to the norm."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def cosine(x1, x2, dim, eps=1e-8):
    return (x1 * x2).sum(dim) / (torch.norm(x1, 2, dim) * torch.norm(x2, 2, dim)).clamp(min=eps)


def attend(query, context, lambda_softmax, focal_type=None):
    """func_attention of SCAN (clipped_l2norm) / BFAN (plus focal re-assignment): attended
    context vectors (batch, queryL, d) for queries (batch, queryL, d), context (batch, sourceL, d)."""
    b, n_q, n_s = context.shape[0], query.shape[1], context.shape[1]
    attn = torch.bmm(context, query.transpose(1, 2))  # (b, sourceL, queryL)
    attn = l2norm_eps(F.leaky_relu(attn, 0.1), 2)
    attn = attn.transpose(1, 2).contiguous().view(b * n_q, n_s)
    attn = F.softmax(attn * lambda_softmax, dim=1).view(b, n_q, n_s)
    if focal_type == "equal":
        keep = (attn * n_s - attn.sum(-1, keepdim=True)) > 0
    elif focal_type == "prob":  # the reference's s x s form
        xi = attn.reshape(b * n_q, n_s, 1)
        xj = attn.reshape(b * n_q, 1, n_s)
        f = (torch.bmm(xi, xj.sqrt()) - xj * xj.sqrt()).sum(-1).view(b, n_q, n_s)
        keep = f > 0
    if focal_type is not None:
        h = torch.where(keep, torch.ones_like(attn), torch.zeros_like(attn))
        attn = h * attn
        attn = attn / attn.sum(-1, keepdim=True)
    weighted = torch.bmm(context.transpose(1, 2), attn.transpose(1, 2).contiguous())  # (b, d, queryL)
    return weighted.transpose(1, 2)


def scan_t2i_pair_scores(images, cap, lambda_softmax, lambda_lse):
    """Caption `cap` (1, n_word, d) against `images` (n, k, d): LogSumExp of word cosines."""
    cap = cap.repeat(images.shape[0], 1, 1)
    row = cosine(cap, attend(cap, images, lambda_softmax), dim=2)
    return torch.log(torch.exp(row * lambda_lse).sum(dim=1, keepdim=True)) / lambda_lse


def bfan_pair_scores(images, cap, lambda_softmax, focal_type):
    cap = cap.repeat(images.shape[0], 1, 1)
    t2i = cosine(cap, attend(cap, images, lambda_softmax, focal_type), dim=2).mean(dim=1, keepdim=True)
    i2t = cosine(images, attend(images, cap, lambda_softmax, focal_type), dim=2).mean(dim=1, keepdim=True)
    return t2i + i2t


def all_pairs(score, images, words, lengths):
    """xattn_score: loop over captions, each against every image -> (n_image, n_caption)."""
    return torch.cat([score(images, words[i : i + 1, : int(lengths[i])]) for i in range(words.shape[0])], 1)


def paired(score, images, words, lengths):
    """xattn_scoreoffline: loop over pairs, image i against caption i -> (n,)."""
    return torch.cat(
        [score(images[i : i + 1], words[i : i + 1, : int(lengths[i])]) for i in range(words.shape[0])], 1
    )[0]


class ReferenceCrossAttention(_ReferenceStep):
    """SCAN+AOQ (t2i, clipped_l2norm, LogSumExp) or BFAN+AOQ step with per-caption loops."""

    def __init__(self, ours, lr, grad_clip=2.0):
        cfg = ours.config
        if ours.name == "scan" and (cfg.cross_attn, cfg.raw_feature_norm, cfg.agg_func) != (
            "t2i",
            "clipped_l2norm",
            "LogSumExp",
        ):
            raise ValueError("the reference-style SCAN covers t2i / clipped_l2norm / LogSumExp only")
        if cfg.precomp_enc_type != "basic" or cfg.no_imgnorm or cfg.no_txtnorm:
            raise ValueError("the reference-style encoders cover the default SCAN/BFAN encoders only")
        if ours.name == "scan":
            self.score = lambda im, cap: scan_t2i_pair_scores(im, cap, cfg.lambda_softmax, cfg.lambda_lse)
        else:
            self.score = lambda im, cap: bfan_pair_scores(im, cap, cfg.lambda_softmax, cfg.focal_type)
        self.fc = nn.Linear(cfg.img_dim, cfg.embed_size)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim)
        self.bi = ours.bi_gru
        self.rnn = nn.GRU(cfg.word_dim, cfg.embed_size, 1, batch_first=True, bidirectional=self.bi)
        image, text = ours.reference_state()
        self.fc.load_state_dict({k[len("fc.") :]: v for k, v in image.items()})
        self.embed.weight.data.copy_(text["embed.weight"])
        self.rnn.load_state_dict({k[len("rnn.") :]: v for k, v in text.items() if k.startswith("rnn.")})
        self.params = list(self.embed.parameters()) + list(self.rnn.parameters()) + list(self.fc.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=lr)
        self.grad_clip = grad_clip

    def forward_emb(self, images, ids, lengths):
        img = l2norm_eps(self.fc(images), dim=-1)
        out = packed_gru(self.embed, self.rnn, ids, lengths)
        if self.bi:
            half = out.shape[2] // 2
            out = (out[:, :, :half] + out[:, :, half:]) / 2
        return img, l2norm_eps(out, dim=-1), [int(n) for n in lengths]

    def loss(self, batch):
        im, s, s_l = self.forward_emb(batch["images"], batch["ids"], batch["lengths"])
        im3, s3, l3 = self.forward_emb(batch["neg_images"], batch["neg_ids"], batch["neg_lengths"])
        im4, s4, l4 = self.forward_emb(batch["pos2_images"], batch["pos2_ids"], batch["pos2_lengths"])
        scores = all_pairs(self.score, im, s, s_l)
        return aoq_loss(
            scores,
            scores.diag(),
            paired(self.score, im, s3, l3),
            paired(self.score, im3, s, s_l),
            paired(self.score, im3, s3, l3),
            paired(self.score, im4, s4, l4),
        )


def reference_step_for(ours, lr):
    """The reference-style trainer of our model `ours` (same weights)."""
    return ReferenceVSRN(ours, lr) if ours.name == "vsrn" else ReferenceCrossAttention(ours, lr)
