"""Tests for VSRN (models/vsrn.py, models/caption_branch.py) against slow hand-written references."""

import numpy as np
import pytest
import torch

import models
from models.caption_branch import masked_caption_nll
from models.losses import LossConfig, retrieval_loss
from models.vsrn import RsGCN, caption_targets
from pipeline_steps.training.checkpoint import load_checkpoint, save_checkpoint

CFG = dict(vocab_size=30, img_dim=16, embed_size=12, word_dim=6, dim_hidden=8, dim_word=5, max_len=10)
TOKENS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20], [21, 22, 23, 24, 25]]


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return models.create_model("vsrn", **(CFG | overrides))


def randomise_bn(model, seed=3):
    """Nonzero BN affine parameters and running stats (the Rs_GCN BNs start at weight = 0)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def images(batch=4, seed=2):
    return torch.randn(batch, 36, CFG["img_dim"], generator=torch.Generator().manual_seed(seed))


def captions(token_lists=TOKENS):
    seqs = [[1] + t + [2] for t in token_lists]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()) + 2, dtype=torch.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
    return ids, lengths


def targets(token_lists=TOKENS, extra_pad=True):
    labels, masks = zip(*(caption_targets(t, CFG["max_len"], extra_pad) for t in token_lists))
    return torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(masks))


def gru_cell(x, h, rnn):
    """PyTorch GRU equations (r, z, n order) written out for one vector."""
    gi = rnn.weight_ih_l0 @ x + rnn.bias_ih_l0
    gh = rnn.weight_hh_l0 @ h + rnn.bias_hh_l0
    H = h.numel()
    r, z = torch.sigmoid(gi[:H] + gh[:H]), torch.sigmoid(gi[H : 2 * H] + gh[H : 2 * H])
    n = torch.tanh(gi[2 * H :] + r * gh[2 * H :])
    return (1 - z) * n + z * h


def gcn_w(layer, x):
    """W(Y) of Rs_GCN by its formulas, region by region: A[i,k] = <theta_i, phi_k> / N,
    y_i = sum_k A[i,k] g_k, then the W conv. x (N, C) -> (N, C), before the BN."""
    lin = lambda conv, v: conv.weight[:, :, 0] @ v + conv.bias
    N = x.shape[0]
    g, th, ph = ([lin(c, x[i]) for i in range(N)] for c in (layer.g, layer.theta, layer.phi))
    return torch.stack(
        [lin(layer.W[0], sum(float(th[i] @ ph[k]) / N * g[k] for k in range(N))) for i in range(N)]
    )


def bn_eval(bn, w):
    return (w - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def gcn_loop(layer, x):
    return bn_eval(layer.W[1], gcn_w(layer, x)) + x


def test_rs_gcn_is_identity_at_init_and_matches_loop():
    torch.manual_seed(0)
    layer = RsGCN(12)
    x = torch.randn(3, 36, 12)
    assert torch.equal(layer(x), x)  # train mode: BN weight = bias = 0
    randomise_bn(layer)
    with torch.no_grad():
        # train mode: BN statistics over batch x regions per channel (biased variance)
        w = torch.stack([gcn_w(layer, x[b]) for b in range(3)])
        mean, var = w.mean(dim=(0, 1)), w.var(dim=(0, 1), unbiased=False)
        bn = layer.W[1]
        want = (w - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias + x
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        layer.eval()
        got = layer(x)
        assert not torch.allclose(got, x)
        for b in range(3):
            torch.testing.assert_close(got[b], gcn_loop(layer, x[b]), atol=1e-5, rtol=1e-5)


def test_rs_gcn_weight_products_match_the_four_maps_with_gradients():
    """The layer applies weight products (W_ph^T W_th, W_W W_g); the literal four 1x1 maps give
    the same outputs and the same gradients for the input and every parameter."""
    torch.manual_seed(1)
    layer = RsGCN(10)
    randomise_bn(layer)
    layer.double()
    x = torch.randn(3, 36, 10, dtype=torch.float64, requires_grad=True)

    def literal(v):
        conv = lambda c, t: t @ c.weight[:, :, 0].t() + c.bias
        g, theta, phi = conv(layer.g, v), conv(layer.theta, v), conv(layer.phi, v)
        w_y = conv(layer.W[0], theta @ phi.transpose(1, 2) / v.shape[1] @ g)
        return layer.W[1](w_y.reshape(-1, 10)).view_as(w_y) + v

    weights = torch.randn(3, 36, 10, dtype=torch.float64)
    inputs = [x] + list(layer.parameters())
    got = torch.autograd.grad((layer(x) * weights).sum(), inputs)
    want = torch.autograd.grad((literal(x) * weights).sum(), inputs)
    torch.testing.assert_close(layer(x), literal(x), atol=1e-12, rtol=1e-12)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], got, want):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10, msg=name)


@pytest.mark.parametrize("over_regions", [True, False])
def test_region_l2norm_axis(over_regions):
    model = make(l2norm_over_regions=over_regions)
    with torch.no_grad():
        v, G = model.encode_image_regions(images())
    assert v.shape == (4, CFG["embed_size"]) and G.shape == (4, 36, CFG["embed_size"])
    torch.testing.assert_close(v.norm(dim=1), torch.ones(4), atol=1e-5, rtol=0)
    axis, other = (1, 2) if over_regions else (2, 1)
    torch.testing.assert_close(G.norm(dim=axis), torch.ones_like(G.norm(dim=axis)), atol=1e-5, rtol=0)
    assert not torch.allclose(G.norm(dim=other), torch.ones_like(G.norm(dim=other)), atol=1e-2)


@pytest.mark.parametrize("f30k", [False, True])
def test_image_path_by_hand(f30k):
    model = make(f30k_layout=f30k)
    assert hasattr(model.img_enc, "bn") == f30k
    randomise_bn(model)
    model.eval()
    x = images(batch=3)
    enc = model.img_enc
    with torch.no_grad():
        v, G = model.encode_image_regions(x)
        h_all = []
        for b in range(3):
            feats = x[b] @ enc.fc.weight.T + enc.fc.bias  # (36, D)
            if not f30k:
                feats = feats / torch.sqrt((feats**2).sum(dim=0, keepdim=True))
            for k in range(1, 5):
                feats = gcn_loop(getattr(enc, f"Rs_GCN_{k}"), feats)
            feats = feats / torch.sqrt((feats**2).sum(dim=0, keepdim=True))
            torch.testing.assert_close(G[b], feats, atol=1e-5, rtol=1e-5)
            h = torch.zeros(CFG["embed_size"])
            for r in range(36):
                h = gru_cell(feats[r], h, enc.img_rnn)
            if f30k:
                h = bn_eval(enc.bn, h)
            h_all.append(h / torch.sqrt((h**2).sum()))
        torch.testing.assert_close(v, torch.stack(h_all), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_images(x), v)


def test_initialisation_and_bn_weight_init():
    model = make()
    r = np.sqrt(6) / np.sqrt(CFG["img_dim"] + CFG["embed_size"])
    assert model.img_enc.fc.weight.abs().max() <= r and torch.all(model.img_enc.fc.bias == 0)
    assert model.txt_enc.embed.weight.abs().max() <= 0.1
    assert all(torch.all(getattr(model.img_enc, f"Rs_GCN_{k}").W[1].weight == 0) for k in range(1, 5))
    uniform = make(f30k_layout=True, embed_size=200).img_enc.bn.weight
    assert 0 <= uniform.min() and uniform.max() <= 1 and uniform.std() > 0.2
    assert torch.all(make(f30k_layout=True, bn_weight_init="ones").img_enc.bn.weight == 1)
    with pytest.raises(ValueError, match="bn_weight_init"):
        make(bn_weight_init="zeros")


def test_caption_encoding_matches_each_caption_alone():
    model = make()
    ids, lengths = captions()
    with torch.no_grad():
        got = model.encode_captions(ids, lengths)
        for b in range(len(ids)):
            h = torch.zeros(CFG["embed_size"])
            for t in range(int(lengths[b])):
                h = gru_cell(model.txt_enc.embed.weight[ids[b, t]], h, model.txt_enc.rnn)
            torch.testing.assert_close(got[b], h / h.norm(), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_captions(ids, lengths.tolist()), got)


def test_caption_targets_by_hand():
    labels, mask = caption_targets([7, 8, 9], 10)
    assert labels.dtype == np.int64 and mask.dtype == np.float32
    assert labels.tolist() == [1, 7, 8, 9, 2, 0, 0, 0, 0, 0, 0]
    assert mask.tolist() == [1] * 6 + [0] * 5
    assert caption_targets([7, 8, 9], 10, extra_pad=False)[1].tolist() == [1] * 5 + [0] * 6
    labels, mask = caption_targets(range(4, 16), 10)  # 14 entries -> cut to 10, last = <end>
    assert labels.tolist() == [1, 4, 5, 6, 7, 8, 9, 10, 11, 2, 0] and mask.tolist() == [1] * 11
    labels, mask = caption_targets(range(4, 12), 10)  # exactly max_len entries: unchanged
    assert labels.tolist() == [1, 4, 5, 6, 7, 8, 9, 10, 11, 2, 0] and mask.tolist() == [1] * 11
    assert caption_targets(range(4, 12), 10, extra_pad=False)[1].tolist() == [1] * 10 + [0]
    labels, mask = caption_targets([40, 41, 42], 60)  # "a dog runs"
    assert labels.shape == (61,) and labels[:6].tolist() == [1, 40, 41, 42, 2, 0] and mask.sum() == 6


def slow_caption_loss(model, G, labels, masks):
    """Per sample, per step, with the direct (concatenating) attention and hand GRU cells."""
    enc_m, dec = model.caption_model.encoder, model.caption_model.decoder
    total = 0.0
    for b in range(len(G)):
        proj = G[b] @ enc_m.vid2hid.weight.T + enc_m.vid2hid.bias
        h, outs = torch.zeros(CFG["dim_hidden"]), []
        for r in range(36):
            h = gru_cell(proj[r], h, enc_m.rnn)
            outs.append(h)
        E = torch.stack(outs)
        for t in range(CFG["max_len"] - 1):
            a = dec.attention
            e = torch.stack(
                [
                    a.linear2.weight[0] @ torch.tanh(a.linear1.weight @ torch.cat([E[r], h]) + a.linear1.bias)
                    for r in range(36)
                ]
            )
            context = (torch.softmax(e, dim=0)[:, None] * E).sum(dim=0)
            h = gru_cell(torch.cat([dec.embedding.weight[labels[b, t]], context]), h, dec.rnn)
            logp = torch.log_softmax(dec.out.weight @ h + dec.out.bias, dim=0)
            total = total - masks[b, t + 1] * logp[labels[b, t + 1]]
    return total / len(G)


@pytest.mark.parametrize("extra_pad", [True, False])
def test_caption_loss_against_slow_loop(extra_pad):
    model = make(caption_mask_extra_pad=extra_pad, caption_loss_weight=0.5)
    randomise_bn(model)
    model.eval()  # dropout off: deterministic
    with torch.no_grad():  # at these tiny sizes the regions' encodings are nearly alike; spread them
        model.caption_model.encoder.vid2hid.weight.mul_(10)
        model.caption_model.decoder.attention.linear1.weight.mul_(3)
    short = TOKENS[:1] + TOKENS[2:]
    labels, masks = targets(short)  # the model's flag, not the batch's mask, decides on <pad>
    batch = {"images": images(batch=3)} | dict(zip(("ids", "lengths"), captions(short)))
    batch |= {"cap_labels": labels, "cap_masks": masks}
    with torch.no_grad():
        v, G = model.encode_image_regions(batch["images"])
        fast = model.caption_loss(G, labels, masks)
        assert model.caption_steps(labels, masks) == (7 if extra_pad else 6) < CFG["max_len"] - 1
        full = model.caption_loss(G, labels, masks, truncate=False)
        want = slow_caption_loss(model, G, labels, targets(short, extra_pad)[1])
        torch.testing.assert_close(fast, want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(full, fast, atol=1e-5, rtol=1e-6)
        img, cap, aux = model.anchor_forward(batch, "cpu")
        torch.testing.assert_close(aux, 0.5 * fast)
        torch.testing.assert_close(img, v)
    model.train()  # the caption branch's dropout is on in training
    assert not torch.equal(model.anchor_forward(batch, "cpu")[2], model.anchor_forward(batch, "cpu")[2])
    labels, masks = targets()  # includes a caption cut at max_len: every step is needed
    assert model.caption_steps(labels, masks) == CFG["max_len"] - 1
    with pytest.raises(ValueError, match="max_len"):
        model.caption_loss(G, labels[:, :-1], masks[:, :-1])


@pytest.mark.parametrize("extra_pad", [True, False])
def test_trimmed_decoder_equals_full_length_in_training(extra_pad):
    """Train mode, dropout on: the decoder cut after the last weighted target gives the loss and
    every gradient of the full max_len - 1 steps (later steps carry zero weight, and dropout masks
    are drawn in the same order); one step fewer would change the loss."""
    model = make(caption_mask_extra_pad=extra_pad)
    randomise_bn(model)
    model.train()
    labels, masks = targets(TOKENS[:1] + TOKENS[2:])
    steps = model.caption_steps(labels, masks)
    assert steps < CFG["max_len"] - 1
    x = images(batch=3)
    results = []
    for truncate in (True, False):
        model.zero_grad()
        torch.manual_seed(7)
        loss = model.caption_loss(model.encode_image_regions(x)[1], labels, masks, truncate=truncate)
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (trimmed, g_trimmed), (full, g_full) = results
    torch.testing.assert_close(trimmed, full, atol=1e-6, rtol=1e-6)
    assert g_trimmed.keys() == g_full.keys() and len(g_full) > 10
    for name in g_full:
        torch.testing.assert_close(g_trimmed[name], g_full[name], atol=1e-6, rtol=1e-5, msg=name)
    torch.manual_seed(7)
    regions = model.encode_image_regions(x)[1]
    short = masked_caption_nll(
        model.caption_model(regions, labels, steps - 1), labels, model.caption_weights(labels, masks)
    )
    assert not torch.allclose(short, full, atol=1e-4)


def test_reference_state_round_trip_and_key_checks():
    source, target = make(seed=1), make(seed=2)
    states = source.reference_state()
    assert len(states) == 3
    img_keys = {
        "fc.weight",
        "fc.bias",
        "img_rnn.weight_ih_l0",
        "img_rnn.weight_hh_l0",
        "img_rnn.bias_ih_l0",
        "img_rnn.bias_hh_l0",
    }
    for k in range(1, 5):
        img_keys |= {f"Rs_GCN_{k}.{c}.{p}" for c in ("g", "theta", "phi", "W.0") for p in ("weight", "bias")}
        img_keys |= {
            f"Rs_GCN_{k}.W.1.{p}"
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        }
    assert set(states[0]) == img_keys
    assert set(states[1]) == {"embed.weight"} | {
        f"rnn.{p}" for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    }
    assert {
        "encoder.vid2hid.weight",
        "encoder.rnn.weight_hh_l0",
        "decoder.embedding.weight",
        "decoder.attention.linear1.weight",
        "decoder.attention.linear2.weight",
        "decoder.rnn.weight_ih_l0",
        "decoder.out.bias",
    } <= set(states[2])
    assert "decoder.attention.linear2.bias" not in states[2]
    assert states[2]["decoder.rnn.weight_ih_l0"].shape == (3 * 8, 5 + 8)
    for s in states:  # num_batches_tracked may be absent (older PyTorch)
        for key in [k for k in s if k.endswith("num_batches_tracked")]:
            del s[key]
    target.load_reference_state(states)
    for name, value in source.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(target.state_dict()[name], value), name
    broken = source.reference_state()
    del broken[0]["Rs_GCN_3.W.1.running_var"]
    with pytest.raises(ValueError, match=r"Rs_GCN_3\.W\.1\.running_var"):
        target.load_reference_state(broken)
    extra = source.reference_state()
    extra[1]["rnn.weight_ih_l1"] = torch.zeros(1)
    with pytest.raises(ValueError, match="rnn.weight_ih_l1"):
        target.load_reference_state(extra)
    with pytest.raises(ValueError, match=r"bn\.weight"):  # a COCO checkpoint into the F30K layout
        make(f30k_layout=True).load_reference_state(states)
    assert "bn.running_var" in make(f30k_layout=True).reference_state()[0]
    retrieval_only = make(captioning=False)
    assert len(retrieval_only.reference_state()) == 2 and retrieval_only.parameter_groups()["caption"] == []
    retrieval_only.load_reference_state(states[:2])


def test_checkpoint_round_trip(tmp_path):
    model = make(f30k_layout=True, offline_bn_updates=False)
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config_dict == model.config_dict and loaded.needs_caption_targets
    assert loaded.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("updates", [True, False])
def test_offline_pass_bn_statistics(updates):
    model = make(offline_bn_updates=updates, f30k_layout=True)
    reference = make(f30k_layout=True)  # same weights (same seed), default behaviour
    model.train(), reference.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in bns]
    x = images()
    with model.offline_pass():
        got = model.encode_images(x)
    torch.testing.assert_close(got, reference.encode_images(x))  # batch statistics either way
    for m, (mean, var, n) in zip(bns, before):
        assert m.momentum == 0.1
        unchanged = torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert unchanged == (not updates) and (int(m.num_batches_tracked) == n) == (not updates)
    with pytest.raises(RuntimeError), model.offline_pass():
        raise RuntimeError("boom")
    assert all(m.momentum == 0.1 for m in bns)


@pytest.mark.parametrize("f30k", [False, True])
def test_gradients_reach_every_parameter(f30k):
    model = make(f30k_layout=f30k)
    randomise_bn(model)  # with zero Rs_GCN BN weights the g/theta/phi/W.0 gradients would be 0
    model.train()
    ids, lengths = captions()
    labels, masks = targets()
    batch = {"images": images(), "ids": ids, "lengths": lengths, "cap_labels": labels, "cap_masks": masks}
    img, cap, aux = model.anchor_forward(batch, "cpu")
    loss, _ = retrieval_loss(model.score_all(img, cap), None, LossConfig())
    (loss + aux).backward()
    groups = model.parameter_groups()
    named = dict(model.named_parameters())
    assert sorted(map(id, groups["retrieval"] + groups["caption"])) == sorted(map(id, named.values()))
    assert {id(p) for p in groups["caption"]} == {id(p) for p in model.caption_model.parameters()}
    for name, param in named.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert make(captioning=False).anchor_forward(batch, "cpu")[2] is None
