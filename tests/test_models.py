"""Tests for the model library: VSE++ encoders against hand-computed references, the registry,
checkpoints and gradient flow through the baseline loss."""

import pytest
import torch

import models
from models.base import MatchingModel
from models.losses import LossConfig, retrieval_loss
from pipeline_steps.training.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import random_caption_batch, random_images

CFG = dict(vocab_size=40, img_dim=12, embed_size=16, word_dim=8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return models.create_model("vsepp", **CFG)


def caption_batch(seed=1, batch=7, max_len=9, extra_pad=2):
    return random_caption_batch(CFG["vocab_size"], seed, batch, max_len, extra_pad)


def images(seed=2, batch=5):
    return random_images(CFG["img_dim"], seed, batch)


def test_caption_encoding_matches_each_caption_alone(model):
    ids, lengths = caption_batch()
    with torch.no_grad():
        got = model.encode_captions(ids, lengths)
        for b in range(len(ids)):
            seq = ids[b : b + 1, : int(lengths[b])]  # unpadded, batch of one
            out, _ = model.rnn(model.embed(seq))  # (1, len, embed)
            last = out[0, -1]
            want = last / torch.sqrt((last**2).sum())
            torch.testing.assert_close(got[b], want, atol=1e-6, rtol=0)


def test_caption_encoding_ignores_padding_content(model):
    ids, lengths = caption_batch()
    noisy = ids.clone()
    pad = torch.arange(ids.shape[1])[None, :] >= lengths[:, None]
    noisy[pad] = 5
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_captions(noisy, lengths), model.encode_captions(ids, lengths), atol=1e-6, rtol=0
        )


def test_image_encoding_by_hand(model):
    x = images()
    with torch.no_grad():
        got = model.encode_images(x)
        w, bias = model.img_fc.weight, model.img_fc.bias
        pooled = x.sum(dim=1) / 36.0
        y = torch.stack([w @ pooled[b] + bias for b in range(len(x))])
        want = y / torch.sqrt((y**2).sum(dim=1, keepdim=True))
    assert got.shape == (len(x), CFG["embed_size"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_embeddings_have_unit_norm_and_scores_are_dot_products(model):
    ids, lengths = caption_batch(batch=5)
    with torch.no_grad():
        img = model.encode_images(images(batch=5))
        cap = model.encode_captions(ids, lengths)
        torch.testing.assert_close(img.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(cap.norm(dim=1), torch.ones(5), atol=1e-5, rtol=0)
        scores = model.score_all(img, cap)
        want = torch.tensor([[float((img[i] * cap[j]).sum()) for j in range(5)] for i in range(5)])
        torch.testing.assert_close(scores, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.score_paired(img, cap), torch.diagonal(want), atol=1e-6, rtol=0)
        # score_all is rectangular when the image and caption counts differ
        assert model.score_all(img[:3], cap).shape == (3, 5)


def test_unknown_model_name_lists_registered_names():
    names = models.model_names()
    assert "vsepp" in names
    with pytest.raises(ValueError) as err:
        models.create_model("no-such-model", **CFG)
    message = str(err.value)
    assert "no-such-model" in message
    assert all(name in message for name in names)


def test_create_vsepp_from_config():
    model = models.create_model("vsepp", vocab_size=33, img_dim=10, embed_size=6, word_dim=4)
    assert isinstance(model, MatchingModel) and model.name == "vsepp" and model.single_vector
    assert model.embed.num_embeddings == 33 and model.embed.embedding_dim == 4
    assert model.img_fc.in_features == 10
    assert model.config_dict == dict(vocab_size=33, img_dim=10, embed_size=6, word_dim=4)
    with torch.no_grad():
        assert model.encode_images(torch.rand(2, 36, 10)).shape == (2, 6)
        assert model.encode_captions(torch.tensor([[1, 5, 2]]), torch.tensor([3])).shape == (1, 6)


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, epoch=3, rsum=412.5)
    loaded, checkpoint = load_checkpoint(path)
    assert type(loaded) is type(model) and not loaded.training
    assert checkpoint["epoch"] == 3 and checkpoint["rsum"] == 412.5
    assert loaded.config_dict == model.config_dict
    model.eval()
    ids, lengths = caption_batch()
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.encode_images(x), model.encode_images(x))
        assert torch.equal(loaded.encode_captions(ids, lengths), model.encode_captions(ids, lengths))
    raw = torch.load(path, weights_only=True)
    assert raw["model_name"] == "vsepp"
    assert raw["state_dict"].keys() == model.state_dict().keys()
    assert list(tmp_path.joinpath("ckpt").iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    "payload",
    [
        {"state_dict": {"w": torch.zeros(2)}},  # a bare state dict wrapper
        {"format": "someone-else/1", "model_name": "vsepp"},
        [1, 2, 3],
    ],
)
def test_foreign_file_is_refused(tmp_path, payload):
    path = tmp_path / "foreign.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="foreign.pt"):
        load_checkpoint(path)


def test_gradients_reach_every_parameter_under_the_baseline_loss(model):
    ids, lengths = caption_batch(batch=6)
    scores = model.score_all(model.encode_images(images(batch=6)), model.encode_captions(ids, lengths))
    loss, terms = retrieval_loss(scores, None, LossConfig())
    assert loss.item() > 0 and set(terms) == {"online"}
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
