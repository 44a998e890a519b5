"""Every refusal a step makes is one line naming the file or option, never a traceback; steps
remove the temporaries that killed writers of their outputs left."""

import fractions
import json
import os

import numpy as np
import pytest
import torch

from models import create_model
from pipeline_steps import (
    evaluate,
    extract_embeddings,
    import_checkpoint,
    mine_candidates,
    prepare_data,
    report,
    train,
)
from pipeline_steps.training.checkpoint import save_checkpoint
from tests.helpers import make_prepared_demo


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    data, prepared = make_prepared_demo(root, 2, 20, 10, 10, ["train", "dev", "test"])
    vocab = json.loads((prepared / "manifest.json").read_text())["vocab_size"]
    model = create_model("vsepp", vocab_size=vocab, img_dim=16, embed_size=8, word_dim=8)
    good = root / "good.pt"
    save_checkpoint(good, model, seed=0, loss_config='{"variant": "baseline"}')
    evil = root / "evil.pt"  # a pickle that would build an arbitrary object
    torch.save({"format": "aoq-pipeline-checkpoint/1", "payload": fractions.Fraction(1, 3)}, evil)
    return {"root": root, "data": data, "prepared": prepared, "good": good, "evil": evil}


def refusal(main, argv):
    """The message of the SystemExit `main(argv)` must raise: one line starting with 'error: '."""
    with pytest.raises(SystemExit) as stop:
        run(main, argv)
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def evaluate_argv(s, checkpoint, device="cpu", out=None):
    return [
        "--checkpoints",
        checkpoint,
        "--data",
        s["data"],
        "--prepared",
        s["prepared"],
        "--evaluation",
        "t",
        "test",
        "full",
        out or s["root"] / "t.json",
        "--device",
        device,
    ]


def extract_argv(s, checkpoint, device="cpu", out=None):
    return [
        "--checkpoint",
        checkpoint,
        "--data",
        s["data"],
        "--prepared",
        s["prepared"],
        "--out",
        out or s["root"] / "e.h5",
        "--device",
        device,
    ]


def run(main, argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("step,argv", [(evaluate, evaluate_argv), (extract_embeddings, extract_argv)])
def test_a_checkpoint_holding_other_objects_is_refused_in_one_line(setup, step, argv):
    message = refusal(step.main, argv(setup, setup["evil"]))
    assert message.startswith(f"error: {setup['evil']}: refused: holds objects other than tensors")
    assert message.count(str(setup["evil"])) == 1


@pytest.mark.parametrize("step,argv", [(evaluate, evaluate_argv), (extract_embeddings, extract_argv)])
@pytest.mark.parametrize("device", ["gpu", "cuda:7", "cpu:0"])
def test_a_bad_device_is_refused_in_one_line(setup, step, argv, device):
    message = refusal(step.main, argv(setup, setup["good"], device))
    assert message.startswith(f"error: --device {device!r}: "), message


def test_mining_on_a_bad_device_is_refused_in_one_line(setup, tmp_path):
    emb = tmp_path / "e.h5"
    run(extract_embeddings.main, extract_argv(setup, setup["good"], out=emb))
    message = refusal(
        mine_candidates.main,
        [
            "--embeddings",
            emb,
            "--out-i2t",
            tmp_path / "i.npy",
            "--out-t2i",
            tmp_path / "t.npy",
            "--k-i2t",
            "5",
            "--k-t2i",
            "2",
            "--device",
            "tpu",
        ],
    )
    assert message.startswith("error: --device 'tpu': expected auto, cpu, cuda or cuda:N")


def train_argv(s, out, offline_size=20, device="cpu"):
    train_config = json.dumps({"epochs": 1, "batch_size": 25, "val_step": 100, "offline_size": offline_size})
    return [
        "--data",
        s["data"],
        "--prepared",
        s["prepared"],
        "--model",
        "vsepp",
        "--model-config",
        '{"embed_size": 8, "word_dim": 8}',
        "--train-config",
        train_config,
        "--loss-config",
        '{"variant": "offtri"}',
        "--candidates-i2t",
        s["root"] / "i2t.npy",
        "--candidates-t2i",
        s["root"] / "t2i.npy",
        "--device",
        device,
        "--out-best",
        out / "b.pt",
        "--out-last",
        out / "l.pt",
        "--out-log",
        out / "v.csv",
        "--resume-dir",
        out / "resume",
    ]


def test_offline_size_above_the_candidates_is_refused_in_one_line(setup, tmp_path):
    rng = np.random.default_rng(0)
    np.save(setup["root"] / "i2t.npy", rng.integers(0, 100, (20, 30)).astype(np.int32))
    np.save(setup["root"] / "t2i.npy", rng.integers(0, 20, (100, 6)).astype(np.int32))
    message = refusal(train.main, train_argv(setup, tmp_path, offline_size=40))
    assert message.startswith(f"error: {setup['root'] / 'i2t.npy'}: ") and "offline_size 40" in message
    run(train.main, train_argv(setup, tmp_path, offline_size=30))  # K = 30 is enough
    assert (tmp_path / "b.pt").exists()


def test_training_on_a_bad_device_is_refused_in_one_line(setup, tmp_path):
    message = refusal(train.main, train_argv(setup, tmp_path, device="gpu"))
    assert message.startswith("error: --device 'gpu': ")


def test_an_imported_checkpoints_refusal_names_its_path_once(setup, tmp_path):
    message = refusal(
        import_checkpoint.main,
        [
            "--reference",
            setup["evil"],
            "--arch",
            "vsrn",
            "--prepared",
            setup["prepared"],
            "--out",
            tmp_path / "x.pt",
        ],
    )
    assert message.count(str(setup["evil"])) == 1, message


def stale_files(*targets):
    """Temporaries as a killed writer of `targets` leaves them (another PID), and a bystander."""
    paths = []
    for target in targets:
        stale = target.with_name(f".{target.stem}.tmp-{os.getpid() + 12345}{target.suffix}")
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"half written")
        paths.append(stale)
    bystander = targets[0].with_name(f".{targets[0].stem}.tmp-notapid{targets[0].suffix}")
    bystander.write_bytes(b"someone else's")
    return paths, bystander


def test_steps_remove_stale_temporaries_of_their_own_outputs(setup, tmp_path):
    s = setup
    prepared = tmp_path / "prepared"
    stale, bystander = stale_files(
        prepared / "vocab.json", prepared / "train_ids.npz", prepared / "manifest.json"
    )
    prepare_data.main(
        [
            "--data",
            str(s["data"]),
            "--out",
            str(prepared),
            "--img-dim",
            "16",
            "--splits",
            "train",
            "dev",
            "test",
        ]
    )
    assert not any(p.exists() for p in stale) and bystander.exists()

    out = tmp_path / "eval.json"
    stale, _ = stale_files(out)
    run(evaluate.main, evaluate_argv(s, s["good"], out=out))
    assert not any(p.exists() for p in stale) and out.exists()

    emb = tmp_path / "e.h5"
    stale, _ = stale_files(emb)
    run(extract_embeddings.main, extract_argv(s, s["good"], out=emb))
    assert not any(p.exists() for p in stale)

    i2t, t2i = tmp_path / "c" / "i2t_demo.npy", tmp_path / "c" / "t2i_demo.npy"
    stale, _ = stale_files(i2t, t2i)
    mine_candidates.main(
        [
            "--embeddings",
            str(emb),
            "--out-i2t",
            str(i2t),
            "--out-t2i",
            str(t2i),
            "--k-i2t",
            "5",
            "--k-t2i",
            "2",
        ]
    )
    assert not any(p.exists() for p in stale) and i2t.exists()

    md, csv, png = tmp_path / "r" / "report.md", tmp_path / "r" / "report.csv", tmp_path / "r" / "curves.png"
    stats = tmp_path / "r" / "statistics.png"
    stale, _ = stale_files(md, csv, png, stats)
    report.main(
        ["--metrics", str(out), "--out-md", str(md), "--out-csv", str(csv), "--out-png", str(png)]
        + ["--out-stats-png", str(stats)]
    )
    assert not any(p.exists() for p in stale) and md.exists()


def test_a_bad_model_config_is_refused_in_one_line(setup, tmp_path):
    argv = train_argv(setup, tmp_path)
    argv[argv.index("--model-config") + 1] = '{"embed_size": 8, "focal_type": "prob"}'
    message = refusal(train.main, argv)
    assert message.startswith("error: --model vsepp --model-config: ") and "focal_type" in message


def test_evaluation_and_extraction_run_in_full_fp32(setup, tmp_path):
    """torch allows TF32 in cuDNN by default; the reference ran in full fp32 (Q-TF32)."""
    for step, argv in (
        (evaluate, evaluate_argv(setup, setup["good"], out=tmp_path / "m.json")),
        (extract_embeddings, extract_argv(setup, setup["good"], out=tmp_path / "e.h5")),
    ):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        run(step.main, argv)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32, step
    torch.backends.cudnn.allow_tf32 = True  # torch's default, for the tests after this one
    torch.backends.cuda.matmul.allow_tf32 = False
