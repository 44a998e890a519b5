"""Fixtures shared by several test files."""

import os

import numpy as np
import pytest
import torch

from tests.helpers import make_prepared_demo


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """A tiny prepared dataset (30 training images, 10 dev) and random offline candidate files."""
    root = tmp_path_factory.mktemp("data")
    data, prepared = make_prepared_demo(root, 3, 30, 10, 10, ["train", "dev"])
    rng = np.random.default_rng(0)
    n_img = 30
    i2t, t2i = root / "i2t_demo.npy", root / "t2i_demo.npy"
    np.save(i2t, rng.integers(0, 5 * n_img, size=(n_img, 25)).astype(np.int32))
    np.save(t2i, rng.integers(0, n_img, size=(5 * n_img, 5)).astype(np.int32))
    return {"data": data, "prepared": prepared, "i2t": i2t, "t2i": t2i}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A step run in-process with --threads N sets torch's thread count for the whole test
    process; restore it, so that no test's numbers depend on which tests ran before it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """Under pytest-xdist (.ci/run: one worker per core) each worker computes with one torch
    thread: two workers of two threads each would oversubscribe the cores, and OpenMP threads
    waiting for a busy core slow everything down many times over."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
