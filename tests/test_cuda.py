"""The CUDA paths against the CPU ones: AMP training steps, the cuDNN GRU, reduced-precision
mining, evaluation on the device, the GPU slot wrapper. Each test skips itself, saying why,
without a CUDA device; benchmarks/gpu_check.sh runs them where there is one."""

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from models.rnn import run_gru
from pipeline_steps import gpu_slot, train
from pipeline_steps.retrieval import metrics, scorers
from tests import test_metrics, test_mining
from tests.helpers import REPO, train_argv
from tests.test_train import read_log, weights

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})",
)


@contextlib.contextmanager
def full_fp32():
    """cuDNN and cuBLAS without TF32 (cuDNN allows it by default), so fp32 means fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def train_on_cuda(train_data, out, amp, model="vsepp"):
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "vsepp": '{"embed_size": 16, "word_dim": 8}',
        "vsrn": '{"embed_size": 16, "word_dim": 8, "dim_hidden": 8, "dim_word": 8, "max_len": 20}',
    }[model]
    cfg = (
        '{"epochs": 1, "batch_size": 32, "val_step": 100, "eval_batch_size": 64,'
        f' "offline_size": 20, "amp": "{amp}"}}'
    )
    argv = train_argv(train_data, out, model, config, cfg, "adapoffquin", device="cuda")
    assert train.main(argv) == 0


@pytest.mark.parametrize("model", ["vsepp", "vsrn"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_steps_are_finite_and_close_to_fp32(train_data, tmp_path, model, amp):
    """The real training step on the GPU: autocast really on (weights differ from fp32), yet
    close; fp16 with its loss scaler."""
    train_on_cuda(train_data, tmp_path / "fp32", "none", model)
    train_on_cuda(train_data, tmp_path / amp, amp, model)
    a, b = weights(tmp_path / "fp32" / "last.pt"), weights(tmp_path / amp / "last.pt")
    diffs = [float((a[k].float() - b[k].float()).abs().max()) for k in a]
    assert max(diffs) > 0
    assert all(math.isfinite(d) and d < 0.05 for d in diffs)
    rows = read_log(tmp_path / amp / "val.csv")
    assert rows and all(math.isfinite(float(r["train_loss"])) for r in rows)


@pytest.mark.parametrize("bidirectional,directions", [(False, "concat"), (True, "concat"), (True, "mean")])
def test_cudnn_gru_matches_the_cpu_path(bidirectional, directions):
    """run_gru: cuDNN on the GPU, the accelerated recurrence (accel/gru.py) on the CPU."""
    torch.manual_seed(0)
    rnn = torch.nn.GRU(12, 16, batch_first=True, bidirectional=bidirectional)
    lengths = torch.tensor([3, 9, 1, 5, 5, 8, 9])
    x = torch.randn(len(lengths), 10, 12)
    token_map = torch.nn.functional.normalize if directions == "mean" else None
    results = {}
    with full_fp32():
        for device in ("cpu", "cuda"):
            module, inputs = rnn.to(device), x.to(device).requires_grad_()
            out, h_n = run_gru(module, inputs, lengths, directions=directions, token_map=token_map)
            weight = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
            grads = torch.autograd.grad((out * weight).sum() + h_n.sum(), [inputs, *module.parameters()])
            results[device] = [t.detach().cpu() for t in (out, h_n, *grads)]
    names = ["out", "h_n", "grad x", *(f"grad {name}" for name, _ in rnn.named_parameters())]
    for name, got, want in zip(names, results["cuda"], results["cpu"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def within_rounding(S, got, want, tol):
    """Each position of the found lists scores (exactly) within `tol` of the brute-force list's."""
    rows = np.arange(S.shape[0])[:, None]
    return np.abs(S[rows, got] - S[rows, want]).max() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mining_on_cuda_matches_fp32_brute_force(dtype):
    k = 10
    img, cap, S = test_mining.make_data(0, k)  # exact in float32, no ties in the top k + 1
    want_i = test_mining.reference_topk(S, test_mining.own_caps, k)
    want_t = test_mining.reference_topk(S.T, test_mining.own_img, 5)
    got_i, got_t = test_mining.mine(img, cap, k, 5, device="cuda", dtype=dtype, block_rows=7)
    if dtype == torch.float32:
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_array_equal(got_t, want_t)
        return
    # Reduced precision may swap near-equal candidates, never beyond its own rounding.
    eps = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    tol = 4 * eps * float((np.abs(img) @ np.abs(cap).T).max())
    assert within_rounding(S, got_i, want_i, tol) and within_rounding(S.T, got_t, want_t, tol)
    for q in range(img.shape[0]):
        assert not test_mining.own_caps(q) & set(got_i[q].tolist()) and len(set(got_i[q].tolist())) == k
    assert all(c // 5 not in got_t[c] for c in range(cap.shape[0]))


def test_evaluation_on_cuda_matches_the_cpu():
    img, cap, _ = test_metrics.make_data(0, n_img=50)  # exact scores on both devices
    with full_fp32():
        for protocol in ("full", "5fold"):
            got = metrics.evaluate(scorers.embedding_scorer(img, cap, device="cuda"), protocol)
            want = metrics.evaluate(scorers.embedding_scorer(img, cap), protocol)
            assert got == want, protocol
        got = metrics.retrieval_ranks(scorers.embedding_scorer(img, cap, device="cuda"), block_size=7)
    want = metrics.retrieval_ranks(scorers.embedding_scorer(img, cap))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_gpu_slot_gives_a_job_one_real_device(tmp_path):
    """The wrapper counts this machine's GPUs itself and hands the job one it can use."""
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", "AOQ_LOCAL_GPUS")}
    devices = gpu_slot.local_devices(env=env)
    assert len(devices) >= 1
    child = (
        "import os, torch; torch.ones(1, device='cuda'); "
        "print(os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.device_count())"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline_steps.gpu_slot", "--gpus", "1", "--lock-dir", str(tmp_path)]
        + ["--", sys.executable, "-c", child],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    visible, count = proc.stdout.split()
    assert visible in devices and count == "1"
