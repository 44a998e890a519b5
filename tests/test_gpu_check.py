"""benchmarks/gpu_check.sh runs its CPU-side parts here (--cpu-only, smallest sizes) and writes a
JSON with every part: ok, or for the CUDA tests alone skipped with the reason."""

import importlib.util
import json
import subprocess

import pytest
import torch

from tests.helpers import ENV, REPO

PARTS = {"cuda_tests", "train_step", "mining", "evaluation"}


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "check.json"
    command = ["bash", "benchmarks/gpu_check.sh", "--cpu-only", "--size", "tiny", "--threads", "1"]
    proc = subprocess.run(
        command + ["--out", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


def test_every_part_passes_or_only_the_cuda_tests_skip_with_their_reason(cpu_check):
    parts = cpu_check["parts"]
    assert set(parts) == PARTS
    for name, part in parts.items():
        if name == "cuda_tests" and part["status"] == "skipped":
            assert part["reason"].startswith("no CUDA device")
            assert part["skips"] and all("no CUDA device" in s["reason"] for s in part["skips"])
            assert part["passed"] > 0 and part["failed"] == 0  # the CPU-side tests of those files ran
        else:
            assert part["status"] == "ok", (name, part.get("output_tail", "")[-2000:])
        assert part["seconds"] > 0


def test_environment_and_benchmark_figures_are_recorded(cpu_check):
    env = cpu_check["environment"]
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert cpu_check["device"] == "cpu" and cpu_check["size"] == "tiny"
    [train_step] = cpu_check["parts"]["train_step"]["results"]
    assert [m["model"] for m in train_step["models"]] == ["vsrn", "scan", "bfan"]
    for model in train_step["models"]:  # ours and the reference-style step from the same weights
        assert model["ours_s"] > 0 and model["ref_s"] > 0 and model["loss_diff"] < 1e-3
    [mining] = cpu_check["parts"]["mining"]["results"]
    assert mining["methods"]["ours"]["sampled_differing"] == 0 and "gemm" in mining["methods"]
    if importlib.util.find_spec("faiss") is None:
        assert "faiss" in mining["skipped"] and "faiss" not in mining["methods"]
    else:
        assert mining["methods"]["faiss"]["sampled_differing"] == 0
    [evaluation] = cpu_check["parts"]["evaluation"]["results"]
    assert evaluation["ranks_equal_reference"] and evaluation["methods"]["ours"]["median_s"] > 0


def test_mining_benchmark_skips_faiss_when_it_is_missing(tmp_path, monkeypatch):
    from benchmarks import mining

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a)
    )
    out = tmp_path / "mining.json"
    sizes = ["--n-img", "60", "--dim", "16", "--k-i2t", "8", "--k-t2i", "3", "--runs", "1"]
    mining.main(sizes + ["--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    assert "not installed" in result["skipped"]["faiss"] and set(result["methods"]) == {"ours", "gemm"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_asks_for_cpu_only(tmp_path):
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path / "x.json")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "--cpu-only" in proc.stderr
    assert not (tmp_path / "x.json").exists()
