"""The accelerated paths (accel/) against the plain ones, end to end; the one switch; builds that
fail, hang or lack vector instructions cost speed only."""

import contextlib
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

import accel
from accel import build, gru, topk
from models import create_model
from models.losses import LossConfig
from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches
from pipeline_steps.data.splits import open_split, read_manifest
from pipeline_steps.retrieval import metrics, mining, scorers
from pipeline_steps.training.step import training_loss
from tests.helpers import REPO, make_prepared_demo

SMALL = {
    "vsepp": {},
    "vsrn": {"dim_hidden": 8, "dim_word": 8, "max_len": 20},
    "scan": {"cross_attn": "t2i", "agg_func": "LogSumExp", "lambda_lse": 6.0},
    "bfan": {"focal_type": "prob"},
}


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel")
    data, prepared = make_prepared_demo(root, 4, 30, 10, 10, ["train", "dev"])
    features, captions, info = open_split(data, prepared, "train")
    rng = np.random.default_rng(0)
    np.save(root / "i2t.npy", rng.integers(0, 150, (30, 25)).astype(np.int32))
    np.save(root / "t2i.npy", rng.integers(0, 30, (150, 5)).astype(np.int32))
    candidates = OfflineCandidates(root / "i2t.npy", root / "t2i.npy", 30, 20)
    vocab = read_manifest(prepared)["vocab_size"]
    return features, captions, candidates, vocab


def step(name, batches, variant):
    """(loss, {parameter: gradient}) of one training step from fixed weights and random state."""
    features, captions, candidates, vocab = batches
    torch.manual_seed(0)
    model = create_model(name, vocab_size=vocab, img_dim=16, embed_size=16, word_dim=8, **SMALL[name])
    targets = model.caption_targets_of if model.needs_caption_targets else None
    batch = TrainBatches(
        features, captions, epoch_batches(150, 32, 0, 0), 0, 0, candidates, caption_targets=targets
    )[1]
    model.train()
    torch.manual_seed(1)  # dropout
    loss, _ = training_loss(model, batch, LossConfig(variant), "cpu")
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["baseline", "adapoffquin"])
@pytest.mark.parametrize("name", list(SMALL))
def test_a_training_step_is_the_same_with_and_without_acceleration(batches, name, variant):
    assert accel.enabled()
    fast_loss, fast_grads = step(name, batches, variant)
    with accel.disabled():
        assert not gru.applies(torch.zeros(1)) and topk.load_kernel() is None
        plain_loss, plain_grads = step(name, batches, variant)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    assert fast_grads.keys() == plain_grads.keys()
    for key, want in plain_grads.items():  # float32 sums in other orders: close at the tensor's scale
        assert (fast_grads[key] - want).abs().max() <= 1e-4 * want.abs().max(), key


def test_evaluation_and_mining_are_the_same_with_and_without_acceleration():
    rng = np.random.default_rng(3)
    img, cap = rng.standard_normal((60, 12)).astype("f4"), rng.standard_normal((300, 12)).astype("f4")
    img[7] = img[8]  # exact ties too
    cap[40:45] = cap[50:55]

    def run():
        ranks = metrics.retrieval_ranks(scorers.embedding_scorer(img, cap))
        out_i, out_t = np.zeros((60, 20), np.int32), np.zeros((300, 8), np.int32)
        mining.mine_both(img, cap, 20, 8, out_i, out_t)
        return ranks, out_i, out_t

    fast = run()
    with accel.disabled():
        plain = run()
    for a, b in zip(fast[0], plain[0]):  # ranks: exactly, ties included (the reference's order)
        np.testing.assert_array_equal(a, b)
    scores = img.astype(np.float64) @ cap.astype(np.float64).T
    # candidates: the same scores in the same order (the plain path may order tied ids otherwise)
    for got, want, table in ((fast[1], plain[1], scores), (fast[2], plain[2], scores.T)):
        np.testing.assert_array_equal(
            np.take_along_axis(table, got.astype(np.int64), 1),
            np.take_along_axis(table, want.astype(np.int64), 1),
        )


def test_the_environment_switch_turns_every_path_off():
    code = (
        "import json, torch, accel; from accel import gru, topk, linear, l2norm, pairs; "
        "x = torch.zeros(2, 3, requires_grad=True); "
        "print(json.dumps([accel.enabled(), gru.applies(x), linear.applies(x), l2norm.applies(x), "
        "pairs.applies(x, x), topk.load_kernel() is None, gru.cell_kernels() is None]))"
    )
    for value, expected in (("1", [False, False, False, False, False, True, True]), (None, None)):
        env = {k: v for k, v in os.environ.items() if k != "AOQ_NO_ACCEL"} | (
            {"AOQ_NO_ACCEL": value} if value else {}
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, check=True
        ).stdout
        got = json.loads(out)
        assert got == (expected or [True, True, True, True, True, False, False]), got
    report = subprocess.run(
        [sys.executable, "-m", "accel"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=os.environ | {"AOQ_NO_ACCEL": "1"},
        check=True,
    ).stdout
    assert report.startswith("accelerated paths: off")


def test_a_hanging_compiler_times_out_and_the_torch_path_runs(tmp_path, monkeypatch):
    slow = tmp_path / "slow-cc"
    slow.write_text("#!/bin/sh\nsleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("CC", str(slow))
    monkeypatch.setenv("AOQ_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "COMPILE_TIMEOUT", 1)
    monkeypatch.setattr(build, "_LOADED", {})
    with pytest.raises(RuntimeError, match="took over 1 s"):
        build.build_library(topk.SOURCE, "aoq_topk")
    assert topk.load_kernel() is None and gru.cell_kernels() is None
    img, cap = np.eye(4, 8, dtype="f4"), np.eye(20, 8, dtype="f4")
    assert metrics.evaluate(scorers.embedding_scorer(img, cap), "full")["rsum"] >= 0  # still evaluates


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the baseline ISA flag is x86-64's")
def test_kernels_built_without_vector_extensions_give_the_same_results(tmp_path, monkeypatch):
    """A CPU without AVX (or another processor) gets the kernels' plain loops: same results."""
    flags = (
        "-O2",
        "-march=x86-64",
        "-mno-avx",
        "-mno-avx2",
        "-mno-avx512f",
        "-shared",
        "-fPIC",
        "-std=gnu99",
    )
    monkeypatch.setenv("AOQ_KERNEL_CACHE", str(tmp_path))
    plain_topk = build.load_library(topk.SOURCE, "aoq_topk_plain", topk._bind, cflags=flags)
    plain_cell = build.load_library(
        gru.CELL_SOURCE, "aoq_gru_cell_plain", gru._bind_cell_kernels, cflags=flags
    )
    assert plain_topk is not None and plain_cell is not None
    rng = np.random.default_rng(5)
    img, cap = rng.integers(-2, 3, (40, 6)).astype("f4"), rng.integers(-2, 3, (200, 6)).astype("f4")

    def mine_and_rank():
        out_i, out_t = np.zeros((40, 30), np.int32), np.zeros((200, 9), np.int32)
        mining.mine_both(img, cap, 30, 9, out_i, out_t, engine="native", block_rows=16)
        return (out_i, out_t, *metrics.retrieval_ranks(scorers.embedding_scorer(img, cap)))

    rnn = torch.nn.GRU(5, 64, batch_first=True, bidirectional=True)  # 64: the streaming stores
    x = torch.randn(6, 9, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    lengths = torch.tensor([9, 3, 1, 9, 5, 2])

    def gru_outputs():
        from models.rnn import run_gru

        out, h = run_gru(rnn, x, lengths)
        grads = torch.autograd.grad((out**2).sum() + h.sum(), [x, *rnn.parameters()])
        return [out.detach(), h.detach(), *grads]

    native, native_gru = mine_and_rank(), gru_outputs()
    monkeypatch.setattr(topk, "load_kernel", lambda: plain_topk)
    monkeypatch.setattr(gru, "cell_kernels", lambda: plain_cell)
    for a, b in zip(native, mine_and_rank()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(native_gru, gru_outputs()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_l2norm_plain_and_accelerated_agree_including_all_zero_rows(dim):
    """The plain path (AOQ_NO_ACCEL, or no gradient) and the hand-written backward give the same
    values and finite, equal gradients, also where a whole row along `dim` is zero."""
    from models.attention import l2norm

    x = torch.randn(4, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 2, :] = 0  # zero rows along every dim
    x[1] = 0
    x[..., 3] = 0
    weights = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for context in (contextlib.nullcontext(), accel.disabled()):
        leaf = x.clone().requires_grad_()
        with context:
            y = l2norm(leaf, dim=dim)
        (grad,) = torch.autograd.grad((y * weights).sum(), [leaf])
        results.append((y.detach(), grad))
    (fast_y, fast_g), (plain_y, plain_g) = results
    assert torch.isfinite(plain_g).all() and torch.isfinite(fast_g).all()
    torch.testing.assert_close(fast_y, plain_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_g, plain_g, rtol=1e-10, atol=1e-10)


def test_the_log_summary_compiles_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AOQ_KERNEL_CACHE", str(tmp_path))  # nothing cached here

    def no_build(*args, **kwargs):
        raise AssertionError("summary() compiled a kernel")

    monkeypatch.setattr(build, "build_library", no_build)
    assert accel.summary() == (
        "on; C kernels gru_cell not built yet (first use builds it), topk not built yet (first use builds it)"
    )
