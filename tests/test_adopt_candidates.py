"""The authors' candidate files are checked before they replace our mining."""

import json

import numpy as np
import pytest

from pipeline_steps import adopt_candidates

N_IMG = 12


@pytest.fixture
def setup(tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(
        json.dumps({"splits": {"train": {"n_images": N_IMG, "n_captions": 5 * N_IMG}}})
    )
    rng = np.random.default_rng(0)
    # Valid files built by brute force: random scores, own positives excluded, sorted.
    scores = rng.normal(size=(N_IMG, 5 * N_IMG))
    own = np.arange(5 * N_IMG) // 5
    scores[own, np.arange(5 * N_IMG)] = -np.inf
    i2t = np.argsort(-scores, axis=1)[:, :20].astype(np.int32)
    t2i = np.argsort(-scores.T, axis=1)[:, :4].astype(np.int32)
    return tmp_path, prepared, i2t, t2i


def run(tmp_path, prepared, i2t, t2i, size=20):
    np.save(tmp_path / "i2t.npy", i2t)
    np.save(tmp_path / "t2i.npy", t2i)
    adopt_candidates.main(
        [
            "--i2t",
            str(tmp_path / "i2t.npy"),
            "--t2i",
            str(tmp_path / "t2i.npy"),
            "--prepared",
            str(prepared),
            "--offline-size",
            str(size),
            "--out-i2t",
            str(tmp_path / "out" / "i2t_x.npy"),
            "--out-t2i",
            str(tmp_path / "out" / "t2i_x.npy"),
        ]
    )


def test_valid_files_are_linked_not_copied(setup):
    tmp_path, prepared, i2t, t2i = setup
    run(tmp_path, prepared, i2t, t2i)
    out = tmp_path / "out" / "i2t_x.npy"
    assert out.is_symlink() and np.array_equal(np.load(out), i2t)
    assert np.array_equal(np.load(tmp_path / "out" / "t2i_x.npy"), t2i)


def corrupt(which, how, i2t, t2i):
    i2t, t2i = i2t.copy(), t2i.copy()
    target = i2t if which == "i2t" else t2i
    if how == "own":
        row = 7
        target[row, 3] = 5 * row + 2 if which == "i2t" else row // 5
    elif how == "range":
        target[0, 0] = 5 * N_IMG if which == "i2t" else N_IMG
    elif how == "dtype":
        target = target.astype(np.int64)
    elif how == "rows":
        target = target[:-1]
    return (target, t2i) if which == "i2t" else (i2t, target)


@pytest.mark.parametrize("which", ["i2t", "t2i"])
@pytest.mark.parametrize(
    "how,message",
    [
        ("own", "own positive"),
        ("range", r"row 0 column 0 holds id \d+, outside \[0, \d+\)"),
        ("dtype", "int32"),
        ("rows", r"expected \d+ rows \(one per training"),
    ],
)
def test_bad_files_are_refused_naming_the_file(setup, which, how, message):
    tmp_path, prepared, i2t, t2i = setup
    bad_i2t, bad_t2i = corrupt(which, how, i2t, t2i)
    with pytest.raises(SystemExit, match=f"{which}.npy: .*{message}"):
        run(tmp_path, prepared, bad_i2t, bad_t2i)
    assert not (tmp_path / "out").exists()


def test_too_few_columns_for_the_offline_size(setup):
    tmp_path, prepared, i2t, t2i = setup
    with pytest.raises(
        SystemExit, match=r"i2t.npy: offline_size 21 draws from the first 21 columns, but the file holds 20"
    ):
        run(tmp_path, prepared, i2t, t2i, size=21)
    with pytest.raises(
        SystemExit, match=r"t2i.npy: offline_size 16 draws from the first 4 columns, but the file holds 3"
    ):
        run(tmp_path, prepared, i2t, t2i[:, :3], size=16)  # t2i needs ceil(16 / 5) = 4 columns
