"""Released checkpoints in the reference layout import into our models and score identically."""

import argparse
import json
from collections import OrderedDict

import pytest
import torch

from models import create_model
from pipeline_steps import import_checkpoint
from pipeline_steps.training.checkpoint import load_checkpoint


def write_reference(path, model, data_name):
    opt = argparse.Namespace(data_name=data_name, max_len=model.config.max_len, margin=0.2)
    states = [OrderedDict((k, v.clone()) for k, v in s.items()) for s in model.reference_state()]
    for state in states:  # saved by PyTorch 0.4.1: no num_batches_tracked entries
        for key in [k for k in state if k.endswith("num_batches_tracked")]:
            del state[key]
    torch.save(
        {"epoch": 7, "model": states, "best_rsum": 401.5, "opt": opt, "Eiters": 12345},
        path,
        _use_new_zipfile_serialization=False,
        pickle_protocol=2,
    )


@pytest.fixture
def prepared(tmp_path):
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"vocab_size": 40, "splits": {}}))
    return folder


@pytest.mark.parametrize("f30k", [False, True])
def test_imported_vsrn_gives_the_reference_models_embeddings(tmp_path, prepared, f30k):
    torch.manual_seed(0)
    reference = create_model(
        "vsrn",
        vocab_size=40,
        img_dim=16,
        embed_size=12,
        word_dim=8,
        dim_hidden=8,
        dim_word=6,
        max_len=14,
        f30k_layout=f30k,
    ).eval()
    for module in reference.modules():  # non-trivial BN statistics, so they must travel too
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
    path = tmp_path / "model_best.pth.tar"
    write_reference(path, reference, "f30k_precomp" if f30k else "coco_precomp")
    out = tmp_path / "imported.pt"
    import_checkpoint.main(
        ["--reference", str(path), "--arch", "vsrn", "--prepared", str(prepared), "--out", str(out)]
    )
    model, checkpoint = load_checkpoint(out)
    assert checkpoint["epoch"] == 7 and checkpoint["val_score4"] == 401.5
    assert model.config.f30k_layout == f30k and model.config.dim_word == 6
    images, ids = torch.rand(3, 36, 16), torch.randint(4, 40, (3, 9))
    lengths = torch.tensor([9, 5, 2])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_images(images), reference.encode_images(images))
        torch.testing.assert_close(
            model.encode_captions(ids, lengths), reference.encode_captions(ids, lengths)
        )


def test_vocabulary_mismatch_is_refused(tmp_path, prepared):
    model = create_model(
        "vsrn", vocab_size=41, img_dim=16, embed_size=12, word_dim=8, dim_hidden=8, dim_word=6, max_len=14
    )
    path = tmp_path / "model_best.pth.tar"
    write_reference(path, model, "coco_precomp")
    with pytest.raises(SystemExit, match="vocabulary of 41 words.*prepared data 40"):
        import_checkpoint.main(
            [
                "--reference",
                str(path),
                "--arch",
                "vsrn",
                "--prepared",
                str(prepared),
                "--out",
                str(tmp_path / "x.pt"),
            ]
        )
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "arch,opt",
    [
        ("bfan", {"focal_type": "prob", "lambda_softmax": 20.0}),
        ("scan", {"cross_attn": "i2t", "agg_func": "LogSumExp", "lambda_lse": 5.0, "lambda_softmax": 4.0}),
    ],
)
def test_imported_cross_attention_model_scores_like_the_reference(tmp_path, prepared, arch, opt):
    torch.manual_seed(1)
    reference = create_model(arch, vocab_size=40, img_dim=16, embed_size=12, word_dim=8, **opt).eval()
    states = [OrderedDict(s) for s in reference.reference_state()]
    assert "fc.weight" in states[0] and "rnn.weight_ih_l0_reverse" in states[1]
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {
            "epoch": 2,
            "model": states,
            "best_rsum": 300.0,
            "Eiters": 9,
            "opt": argparse.Namespace(data_name="f30k_precomp", margin=0.2, **opt),
        },
        path,
        _use_new_zipfile_serialization=False,
        pickle_protocol=2,
    )
    out = tmp_path / "imported.pt"
    import_checkpoint.main(
        ["--reference", str(path), "--arch", arch, "--prepared", str(prepared), "--out", str(out)]
    )
    model, _ = load_checkpoint(out)
    for key, value in opt.items():
        assert getattr(model.config, key) == value
    images, ids = torch.rand(3, 36, 16), torch.randint(4, 40, (4, 7))
    lengths = torch.tensor([7, 4, 2, 3])
    with torch.no_grad():
        ours = model.score_all(model.encode_images(images), model.encode_captions(ids, lengths))
        theirs = reference.score_all(reference.encode_images(images), reference.encode_captions(ids, lengths))
    torch.testing.assert_close(ours, theirs)
