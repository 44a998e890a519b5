"""SCAN and BFAN models: encoders by hand, the caption representation helpers, gradient flow
through the retrieval losses, the registry and checkpoints."""

import math

import pytest
import torch

import models
from models import attention as xa
from models.bfan import BFAN, BFANConfig
from models.losses import LossConfig, OfflineScores, retrieval_loss
from models.scan import SCAN, CaptionFeatures, SCANConfig
from pipeline_steps.training.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import random_caption_batch, random_images

CFG = dict(vocab_size=40, img_dim=12, embed_size=16, word_dim=8)


def caption_batch(seed=1, batch=6, max_len=9, extra_pad=2):
    return random_caption_batch(CFG["vocab_size"], seed, batch, max_len, extra_pad)


def images(seed=2, batch=6):
    return random_images(CFG["img_dim"], seed, batch)


def make(name, **extra):
    torch.manual_seed(0)
    return models.create_model(name, **CFG, **extra)


@pytest.mark.parametrize("name,extra", [("scan", {}), ("scan", {"bi_gru": False}), ("bfan", {})])
def test_caption_encoder_matches_each_caption_alone(name, extra):
    model = make(name, **extra)
    ids, lengths = caption_batch()
    with torch.no_grad():
        got = model.encode_captions(ids, lengths)
        assert isinstance(got, CaptionFeatures)
        assert got.words.shape == (len(ids), int(lengths.max()), CFG["embed_size"])
        assert torch.equal(got.lengths, lengths)
        for b in range(len(ids)):
            n = int(lengths[b])
            out, _ = model.rnn(model.embed(ids[b : b + 1, :n]))  # unpadded, batch of one
            if model.bi_gru:
                d = CFG["embed_size"]
                out = (out[..., :d] + out[..., d:]) / 2  # average of the two directions
            want = out[0] / (torch.sqrt((out[0] ** 2).sum(dim=1, keepdim=True)) + 1e-8)
            torch.testing.assert_close(got.words[b, :n], want, atol=1e-6, rtol=0)
            assert (got.words[b, n:] == 0).all()  # padded positions are zero
            torch.testing.assert_close(got.words[b, :n].norm(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    assert model.rnn.bidirectional == extra.get("bi_gru", True)


def test_no_txtnorm_and_no_imgnorm_skip_normalisation():
    model = make("scan", no_txtnorm=True, no_imgnorm=True)
    ids, lengths = caption_batch()
    with torch.no_grad():
        words = model.encode_captions(ids, lengths).words
        x = images(batch=2)
        torch.testing.assert_close(model.encode_images(x), model.img_fc(x))
    assert not torch.allclose(words[-1, : int(lengths[-1])].norm(dim=1), torch.ones(int(lengths[-1])))


@pytest.mark.parametrize("enc_type", ["basic", "weight_norm"])
def test_image_encoder_by_hand(enc_type):
    model = make("scan", precomp_enc_type=enc_type)
    x = images(batch=3)
    if enc_type == "basic":
        w, bias = model.img_fc.weight, model.img_fc.bias
        r = math.sqrt(6.0) / math.sqrt(CFG["img_dim"] + CFG["embed_size"])
        assert w.abs().max() <= r and (bias == 0).all()
    else:
        g = model.img_fc.parametrizations.weight.original0
        v = model.img_fc.parametrizations.weight.original1
        assert g.dim() == 0  # one scalar over the whole matrix
        w, bias = g * v / torch.sqrt((v**2).sum()), model.img_fc.bias
    with torch.no_grad():
        got = model.encode_images(x)
        y = torch.einsum("od,bkd->bko", w, x) + bias
        want = y / (torch.sqrt((y**2).sum(dim=-1, keepdim=True)) + 1e-8)
    assert got.shape == (3, 36, CFG["embed_size"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["scan", "bfan"])
def test_concat_and_slice_round_trip_with_different_lengths(name):
    model = make(name).eval()
    batches = [caption_batch(seed=s, batch=4, max_len=m) for s, m in ((1, 3), (2, 9), (3, 5))]
    x = images(batch=3)
    with torch.no_grad():
        reps = [model.encode_captions(ids, lengths) for ids, lengths in batches]
        whole = model.concat_representations(reps)
        assert whole.words.shape == (12, max(r.words.shape[1] for r in reps), CFG["embed_size"])
        start = 0
        for rep in reps:
            part = model.slice_representation(whole, start, start + 4)
            assert part.words.shape == rep.words.shape  # trimmed back to its own longest
            assert torch.equal(part.words, rep.words) and torch.equal(part.lengths, rep.lengths)
            start += 4
        img = model.encode_images(x)
        # image representations are plain tensors
        torch.testing.assert_close(model.concat_representations([img[:1], img[1:]]), img)
        torch.testing.assert_close(model.slice_representation(img, 1, 3), img[1:3])
        # scoring the concatenation == scoring each batch
        got = model.score_all(img, whole)
        want = torch.cat([model.score_all(img, rep) for rep in reps], dim=1)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name,extra",
    [
        ("scan", {}),
        (
            "scan",
            {
                "cross_attn": "i2t",
                "agg_func": "Mean",
                "lambda_softmax": 4.0,
                "precomp_enc_type": "weight_norm",
            },
        ),
        ("bfan", {"focal_type": "equal"}),
        ("bfan", {"focal_type": "prob"}),
    ],
)
def test_gradients_reach_every_parameter(name, extra):
    model = make(name, **extra).train()
    ids, lengths = caption_batch(batch=6)
    img, cap = model.encode_images(images(batch=6)), model.encode_captions(ids, lengths)
    scores = model.score_all(img, cap)
    assert scores.shape == (6, 6)
    loss, _ = retrieval_loss(scores, None, LossConfig(max_violation=True))
    loss.backward()
    for pname, p in model.named_parameters():
        if pname == "embed.weight":  # only the rows of words in the batch get gradient
            used = torch.unique(ids[ids > 0])
            assert torch.isfinite(p.grad).all() and (p.grad[used].abs().sum(dim=1) > 0).all(), pname
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["scan", "bfan"])
def test_paired_scores_feed_the_aoq_loss(name):
    model = make(name).train()
    ids, lengths = caption_batch(batch=5)
    img, cap = model.encode_images(images(batch=5)), model.encode_captions(ids, lengths)
    img3, cap3 = (
        model.encode_images(images(seed=9, batch=5)),
        model.encode_captions(*caption_batch(seed=4, batch=5)),
    )
    pairs = [(img, cap3), (img3, cap), (img3, cap3), (img3, cap)]
    offline = OfflineScores(*[model.score_paired(i, c) for i, c in pairs])
    with torch.no_grad():
        torch.testing.assert_close(offline.off_t, model.score_all(img, cap3).diagonal(), atol=1e-6, rtol=0)
    loss, _ = retrieval_loss(model.score_all(img, cap), offline, LossConfig(variant="adapoffquin"))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_scores_equal_the_kernels():
    scan = make(
        "scan",
        cross_attn="i2t",
        raw_feature_norm="softmax",
        agg_func="Max",
        lambda_lse=5.0,
        lambda_softmax=4.0,
        chunk=2,
    ).eval()
    bfan = make("bfan", focal_type="prob", lambda_softmax=10.0, chunk=3).eval()
    ids, lengths = caption_batch(batch=4)
    with torch.no_grad():
        for model, kernel in (
            (
                scan,
                lambda v, c: xa.scan_scores(
                    v,
                    c.words,
                    c.lengths,
                    direction="i2t",
                    raw_feature_norm="softmax",
                    agg_func="Max",
                    lambda_lse=5.0,
                    lambda_softmax=4.0,
                ),
            ),
            (bfan, lambda v, c: xa.bfan_scores(v, c.words, c.lengths, "prob", 10.0)),
        ):
            img, cap = model.encode_images(images(batch=4)), model.encode_captions(ids, lengths)
            torch.testing.assert_close(model.score_all(img, cap), kernel(img, cap), atol=1e-6, rtol=0)
    assert bfan.focal_fallbacks.dim() == 0 and int(bfan.focal_fallbacks) >= 0


def test_bfan_counts_fallbacks_of_one_token_captions():
    model = make("bfan").eval()
    ids, lengths = torch.tensor([[5, 0], [6, 7]]), torch.tensor([1, 2])
    with torch.no_grad():
        scores = model.score_all(model.encode_images(images(batch=3)), model.encode_captions(ids, lengths))
    assert torch.isfinite(scores).all()
    assert int(model.focal_fallbacks) >= 3 * 36  # every region of the 1-token caption's i2t pass


def test_registry_and_config_validation():
    assert {"scan", "bfan"} <= set(models.model_names())
    scan, bfan = make("scan"), make("bfan")
    assert isinstance(scan, SCAN) and isinstance(bfan, BFAN)
    assert not scan.single_vector and not bfan.single_vector
    assert scan.config == SCANConfig(**CFG) and bfan.config == BFANConfig(**CFG)
    assert (
        scan.config.raw_feature_norm,
        scan.config.agg_func,
        scan.config.lambda_lse,
        scan.config.lambda_softmax,
        bfan.config.lambda_softmax,
    ) == ("clipped_l2norm", "LogSumExp", 6.0, 9.0, 20.0)
    for name, bad in (
        ("scan", {"cross_attn": "x"}),
        ("scan", {"agg_func": "mean"}),
        ("scan", {"raw_feature_norm": "l3"}),
        ("bfan", {"focal_type": "x"}),
        ("bfan", {"precomp_enc_type": "x"}),
    ):
        with pytest.raises(ValueError):
            make(name, **bad)


@pytest.mark.parametrize("name", ["scan", "bfan"])
def test_checkpoint_round_trip(name, tmp_path):
    model = make(name, precomp_enc_type="weight_norm")
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert type(loaded) is type(model) and loaded.config_dict == model.config_dict
    model.eval()
    ids, lengths = caption_batch()
    with torch.no_grad():
        a = model.score_all(model.encode_images(images()), model.encode_captions(ids, lengths))
        b = loaded.score_all(loaded.encode_images(images()), loaded.encode_captions(ids, lengths))
    assert torch.equal(a, b)
