"""extract_embeddings, mine_candidates and evaluate as steps, checked against brute force."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models import create_model
from pipeline_steps import evaluate, extract_embeddings, mine_candidates
from pipeline_steps.data.splits import open_split
from pipeline_steps.retrieval.encode import encode_split
from pipeline_steps.training.checkpoint import save_checkpoint
from tests.helpers import make_prepared_demo


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    data, prepared = make_prepared_demo(root, 1, 24, 6, 12, ["train", "dev", "test", "testall"])
    vocab = json.loads((prepared / "manifest.json").read_text())["vocab_size"]
    checkpoints = []
    for seed in (0, 1):  # two differently initialised models: an ensemble
        torch.manual_seed(seed)
        model = create_model("vsepp", vocab_size=vocab, img_dim=16, embed_size=12, word_dim=8)
        checkpoints.append(root / f"model{seed}.pt")
        save_checkpoint(checkpoints[-1], model, seed=seed, loss_config='{"variant": "offquin"}')
    return {"root": root, "data": data, "prepared": prepared, "checkpoints": checkpoints}


def per_query_ranks(sims):
    """Reference ranks by a full sort per query (image q owns captions 5q..5q+4)."""
    n_img = sims.shape[0]
    i2t = np.array(
        [
            min(np.where(np.argsort(-sims[q]) == c)[0][0] for c in range(5 * q, 5 * q + 5))
            for q in range(n_img)
        ]
    )
    t2i = np.array([np.where(np.argsort(-sims[:, c]) == c // 5)[0][0] for c in range(5 * n_img)])
    return i2t, t2i


def test_extract_writes_the_models_embeddings(setup):
    out = setup["root"] / "train.h5"
    extract_embeddings.main(
        [
            "--checkpoint",
            str(setup["checkpoints"][0]),
            "--data",
            str(setup["data"]),
            "--prepared",
            str(setup["prepared"]),
            "--out",
            str(out),
            "--batch-size",
            "7",
            "--device",
            "cpu",
        ]
    )
    model = torch.load(setup["checkpoints"][0], weights_only=True)
    features, captions, info = open_split(setup["data"], setup["prepared"], "train")
    net = create_model("vsepp", **model["model_config"])
    net.load_state_dict(model["state_dict"])
    ref_img, ref_cap = encode_split(net, features, captions, info.n_captions, 100, "cpu")
    with h5py.File(out, "r") as h5:
        np.testing.assert_allclose(h5["images"][:], ref_img.numpy(), atol=1e-6)
        np.testing.assert_allclose(h5["captions"][:], ref_cap.numpy(), atol=1e-6)
        assert h5["images"].shape == (24, 12) and h5["captions"].shape == (120, 12)
        assert h5.attrs["model"] == "vsepp" and h5.attrs["split"] == "train"


def test_mine_step_equals_brute_force(setup):
    emb = setup["root"] / "train.h5"
    if not emb.exists():
        test_extract_writes_the_models_embeddings(setup)
    i2t_path, t2i_path = setup["root"] / "i2t_demo.npy", setup["root"] / "t2i_demo.npy"
    mine_candidates.main(
        [
            "--embeddings",
            str(emb),
            "--out-i2t",
            str(i2t_path),
            "--out-t2i",
            str(t2i_path),
            "--k-i2t",
            "50",
            "--k-t2i",
            "10",
            "--device",
            "cpu",
        ]
    )
    with h5py.File(emb, "r") as h5:
        sims = h5["images"][:].astype(np.float64) @ h5["captions"][:].astype(np.float64).T
    own = np.arange(120) // 5
    masked = sims.copy()
    masked[own, np.arange(120)] = -np.inf
    i2t, t2i = np.load(i2t_path), np.load(t2i_path)
    assert i2t.dtype == np.int32 and t2i.dtype == np.int32
    np.testing.assert_array_equal(i2t, np.argsort(-masked, axis=1, kind="stable")[:, :50])
    np.testing.assert_array_equal(t2i, np.argsort(-masked.T, axis=1, kind="stable")[:, :10])


def test_mine_step_bad_k_leaves_nothing(setup, tmp_path):
    emb = setup["root"] / "train.h5"
    if not emb.exists():
        test_extract_writes_the_models_embeddings(setup)
    with pytest.raises(SystemExit, match="train.h5"):
        mine_candidates.main(
            [
                "--embeddings",
                str(emb),
                "--out-i2t",
                str(tmp_path / "i2t.npy"),
                "--out-t2i",
                str(tmp_path / "t2i.npy"),
                "--k-i2t",
                "500",
                "--device",
                "cpu",
            ]
        )
    assert list(tmp_path.iterdir()) == []


def test_evaluate_ensemble_equals_per_query_reference(setup):
    out1k, out5k = setup["root"] / "a.json", setup["root"] / "b.json"
    evaluate.main(
        [
            "--checkpoints",
            *map(str, setup["checkpoints"]),
            "--data",
            str(setup["data"]),
            "--prepared",
            str(setup["prepared"]),
            "--device",
            "cpu",
            "--evaluation",
            "t1k",
            "test",
            "full",
            str(out1k),
            "--evaluation",
            "c1k",
            "testall",
            "5fold",
            str(out5k),
        ]
    )
    sims = {}
    for split in ("test", "testall"):
        features, captions, info = open_split(setup["data"], setup["prepared"], split)
        total = 0
        for path in setup["checkpoints"]:
            ckpt = torch.load(path, weights_only=True)
            net = create_model("vsepp", **ckpt["model_config"])
            net.load_state_dict(ckpt["state_dict"])
            img, cap = encode_split(net, features, captions, info.n_captions, 64, "cpu")
            total = total + img.double().numpy() @ cap.double().numpy().T
        sims[split] = total / 2
    result = json.loads(out1k.read_text())
    i2t, t2i = per_query_ranks(sims["test"])
    with np.load(setup["root"] / "a.ranks.npz") as written:  # the ranks the report resamples
        np.testing.assert_array_equal(written["i2t"], i2t)
        np.testing.assert_array_equal(written["t2i"], t2i)
    assert result["i2t_r1"] == pytest.approx(100 * np.mean(i2t < 1))
    assert result["t2i_r5"] == pytest.approx(100 * np.mean(t2i < 5))
    assert result["i2t_medr"] == np.floor(np.median(i2t)) + 1
    assert result["t2i_meanr"] == pytest.approx(t2i.mean() + 1)
    assert [m["variant"] for m in result["models"]] == ["offquin", "offquin"]
    folds = json.loads(out5k.read_text())
    per_fold, fold_ranks = [], []
    for f in range(5):
        i2t, t2i = per_query_ranks(sims["testall"][4 * f : 4 * f + 4, 20 * f : 20 * f + 20])
        per_fold.append(100 * np.mean(i2t < 5))
        fold_ranks.append((i2t, t2i))
    with np.load(setup["root"] / "b.ranks.npz") as written:  # within each fold, in split order
        np.testing.assert_array_equal(written["i2t"], np.concatenate([r[0] for r in fold_ranks]))
        np.testing.assert_array_equal(written["t2i"], np.concatenate([r[1] for r in fold_ranks]))
    assert folds["i2t_r5"] == pytest.approx(np.mean(per_fold))
    assert folds["protocol"] == "5fold" and len(folds["folds"]) == 5


def test_metrics_carry_provenance_and_weights_digests(setup):
    """The commit is the checkout's; the digest tells the two seeds' weights apart and does not
    depend on the checkpoint's other fields."""
    import subprocess

    from pipeline_steps.common.provenance import weights_digest

    result = json.loads((setup["root"] / "a.json").read_text())
    origin = result["provenance"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    assert origin["git_commit"] == (head or "unknown") and isinstance(origin["git_dirty"], bool)
    assert origin["torch"] == torch.__version__ and origin["numpy"] == np.__version__
    assert origin["device"] == "cpu" and origin["tokenizer"].startswith("nltk.word_tokenize")
    digests = [m["weights_sha256"] for m in result["models"]]
    assert len(set(digests)) == 2
    ckpt = torch.load(setup["checkpoints"][0], weights_only=True)
    net = create_model("vsepp", **ckpt["model_config"])
    net.load_state_dict(ckpt["state_dict"])
    assert weights_digest(net) == digests[0]
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    assert weights_digest(net) != digests[0]
    assert [(m["seed"], m["epoch"], m["iteration"]) for m in result["models"]] == [
        (0, ckpt.get("epoch"), ckpt.get("iteration")),
        (1, ckpt.get("epoch"), ckpt.get("iteration")),
    ]
