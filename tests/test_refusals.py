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
    candidate_files(setup)  # 30 i2t and 6 t2i columns
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


def candidate_files(s, i2t=None, t2i=None):
    """Valid candidate files of the fixture's 20 training images (each row's own positives
    excluded), with `i2t` / `t2i` replacing them where given."""
    rng = np.random.default_rng(1)
    own_i2t = np.array([[c for c in rng.permutation(100) if c // 5 != row][:30] for row in range(20)])
    own_t2i = np.array([[i for i in rng.permutation(20) if i != row // 5][:6] for row in range(100)])
    paths = s["root"] / "i2t.npy", s["root"] / "t2i.npy"
    for path, array, given in zip(paths, (own_i2t, own_t2i), (i2t, t2i)):
        if isinstance(given, bytes):
            path.write_bytes(given)
        else:
            np.save(path, (array if given is None else given(array.copy())).astype(np.int32))
    return paths


def _poke(row, col, value):
    def change(array):
        array[row, col] = value
        return array

    return change


@pytest.mark.parametrize(
    "i2t,t2i,expected",
    [
        (b"", None, "i2t.npy: not a readable .npy array (the file is empty or cut short)"),
        (None, b"", "t2i.npy: not a readable .npy array (the file is empty or cut short)"),
        (_poke(3, 5, 100), None, "i2t.npy: row 3 column 5 holds id 100, outside [0, 100)"),
        (_poke(4, 0, -1), None, "i2t.npy: row 4 column 0 holds id -1, outside [0, 100)"),
        (None, _poke(7, 1, -3), "t2i.npy: row 7 column 1 holds id -3, outside [0, 20)"),
    ],
    ids=["i2t empty", "t2i empty", "i2t too large", "i2t negative", "t2i negative"],
)
def test_bad_candidates_are_refused_by_training_and_by_adoption_alike(setup, tmp_path, i2t, t2i, expected):
    """One check (pipeline_steps/data/candidates.py) for both steps: an unreadable file or an
    id out of range (a negative one would silently count from the end) is refused."""
    from pipeline_steps import adopt_candidates

    i2t_path, t2i_path = candidate_files(setup, i2t, t2i)
    message = refusal(train.main, train_argv(setup, tmp_path))
    assert message.startswith(f"error: {setup['root'] / expected.split(':')[0]}") and expected in message
    adopt = ["--i2t", i2t_path, "--t2i", t2i_path, "--prepared", setup["prepared"], "--offline-size", "20"]
    adopt += ["--out-i2t", tmp_path / "a" / "i2t.npy", "--out-t2i", tmp_path / "a" / "t2i.npy"]
    assert expected in refusal(adopt_candidates.main, adopt)
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "i2t,t2i,expected,count",
    [
        (_poke(2, 9, 11), None, "i2t.npy: row 2 lists its own positive (11) in column 9", "1 candidates"),
        (None, _poke(12, 0, 2), "t2i.npy: row 12 lists its own positive (2) in column 0", "1 candidates"),
    ],
    ids=["i2t", "t2i"],
)
def test_own_positives_are_refused_on_adoption_and_counted_in_training(
    setup, tmp_path, caplog, i2t, t2i, expected, count
):
    from pipeline_steps import adopt_candidates

    i2t_path, t2i_path = candidate_files(setup, i2t, t2i)
    adopt = ["--i2t", i2t_path, "--t2i", t2i_path, "--prepared", setup["prepared"], "--offline-size", "20"]
    adopt += ["--out-i2t", tmp_path / "a" / "i2t.npy", "--out-t2i", tmp_path / "a" / "t2i.npy"]
    assert expected in refusal(adopt_candidates.main, adopt)
    run(train.main, train_argv(setup, tmp_path))
    warnings = [r.getMessage() for r in caplog.records if "own positives" in r.getMessage()]
    assert len(warnings) == 1 and count in warnings[0] and expected.split(":")[0] in warnings[0]


def test_the_fixtures_candidates_pass_both(setup, tmp_path):
    candidate_files(setup)
    run(train.main, train_argv(setup, tmp_path))
    assert (tmp_path / "b.pt").exists()


def test_empty_feature_files_are_refused_in_one_line(setup, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in setup["data"].iterdir():
        (data / path.name).symlink_to(path)
    (data / "test_ims.npy").unlink()
    (data / "test_ims.npy").write_bytes(b"")
    out = tmp_path / "prepared"
    argv = ["--data", data, "--out", out, "--img-dim", "16", "--splits", "train", "dev", "test"]
    message = refusal(prepare_data.main, argv)
    empty = "not a readable .npy array (the file is empty or cut short)"
    assert f"{data / 'test_ims.npy'}: {empty}" in message
    message = refusal(
        evaluate.main, evaluate_argv({**setup, "data": data}, setup["good"], out=tmp_path / "t.json")
    )
    assert f"{data / 'test_ims.npy'}: not a readable .npy array" in message


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, bytes(range(256)) * 40, b"PK\x03\x04garbage"])
def test_random_bytes_as_a_checkpoint_are_refused_in_one_line(setup, tmp_path, content):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(content)
    # Garbage that happens to start like a pickle is refused by the weights-only unpickler.
    readable = (
        f"error: {bogus}: not a readable checkpoint (",
        f"error: {bogus}: refused: holds objects other",
    )
    message = refusal(evaluate.main, evaluate_argv(setup, bogus, out=tmp_path / "t.json"))
    assert message.startswith(readable), message
    candidate_files(setup)
    message = refusal(train.main, train_argv(setup, tmp_path) + ["--init-from", bogus])
    assert message.startswith(readable), message
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "b.pt").exists()


def vocabulary_checkpoint(s, path, vocab_size=None, **extra):
    manifest = json.loads((s["prepared"] / "manifest.json").read_text())
    size = manifest["vocab_size"] if vocab_size is None else vocab_size
    model = create_model("vsepp", vocab_size=size, img_dim=16, embed_size=8, word_dim=8)
    save_checkpoint(path, model, seed=0, loss_config='{"variant": "baseline"}', **extra)
    return path, manifest


@pytest.mark.parametrize("change", [+5, -1], ids=["larger", "smaller"])
def test_a_checkpoint_of_another_vocabulary_size_is_refused(setup, tmp_path, change):
    _, manifest = vocabulary_checkpoint(setup, tmp_path / "v.pt")
    path, _ = vocabulary_checkpoint(setup, tmp_path / "v.pt", manifest["vocab_size"] + change)
    message = refusal(evaluate.main, evaluate_argv(setup, path, out=tmp_path / "t.json"))
    size = manifest["vocab_size"] + change
    assert message.startswith(f"error: {path}: trained with a vocabulary of {size} words, but ")
    assert not (tmp_path / "t.json").exists()


def test_a_checkpoint_of_another_vocabulary_of_the_same_size_is_refused(setup, tmp_path):
    manifest = json.loads((setup["prepared"] / "manifest.json").read_text())
    assert len(manifest["vocab_sha256"]) == 64
    path, _ = vocabulary_checkpoint(setup, tmp_path / "v.pt", vocab_sha256="0" * 64)
    message = refusal(evaluate.main, evaluate_argv(setup, path, out=tmp_path / "t.json"))
    assert "trained with another vocabulary of the same size (vocab.json sha256 000000000000" in message
    same, _ = vocabulary_checkpoint(setup, tmp_path / "w.pt", vocab_sha256=manifest["vocab_sha256"])
    run(evaluate.main, evaluate_argv(setup, same, out=tmp_path / "t.json"))
    assert (tmp_path / "t.json").exists()


def test_training_records_the_vocabulary_it_used(setup, tmp_path):
    candidate_files(setup)
    run(train.main, train_argv(setup, tmp_path))
    manifest = json.loads((setup["prepared"] / "manifest.json").read_text())
    assert torch.load(tmp_path / "b.pt", weights_only=True)["vocab_sha256"] == manifest["vocab_sha256"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary(setup, tmp_path, monkeypatch):
    """The ranks file runs out of space half-way: one line naming it and the free space."""
    import errno

    from pipeline_steps.common import atomic

    real_savez = np.savez

    def savez_until_full(handle, **arrays):
        handle.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_until_full)
    monkeypatch.setattr(atomic, "free_bytes", lambda folder: 4096)
    out = tmp_path / "eval" / "t.json"
    message = refusal(evaluate.main, evaluate_argv(setup, setup["good"], out=out))
    ranks = out.with_name("t.ranks.npz")
    assert message == (
        f"error: {ranks}: no space left on the disk: 4096 bytes free in {ranks.parent} when 1000 bytes "
        "of it were written; free at least that much more and rerun"
    )
    assert list(out.parent.iterdir()) == []
    monkeypatch.setattr(np, "savez", real_savez)
