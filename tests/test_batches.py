"""Tests for pipeline_steps.data.batches: AOQ offline sampling rule, epochs, TrainBatches."""

import pickle
import re

import numpy as np
import pytest
import torch

from pipeline_steps.data.batches import OfflineCandidates, TrainBatches, epoch_batches
from pipeline_steps.data.precomp import DataError, ImageFeatures, SplitInfo
from pipeline_steps.data.text import END, SPECIAL_TOKENS, START, CaptionIds, encode

N_IMG, OFF = 30, 23  # 23 is not a multiple of 5: t2i needs ceil(23/5) = 5 columns


def save(path, arr):
    np.save(path, arr)
    return path


def coded_candidates(tmp_path):
    """i2t[k, j] is a caption whose image is (k + j) % N and t2i[c, j] = (c + j) % N, so the rank j
    of a draw is recoverable from the anchor; i2t has 2 spare columns that must never be drawn."""
    k, j = np.arange(N_IMG)[:, None], np.arange(OFF + 2)[None, :]
    i2t = (5 * ((k + j) % N_IMG) + j % 5).astype(np.int32)
    c, j = np.arange(5 * N_IMG)[:, None], np.arange(5)[None, :]
    t2i = ((c + j) % N_IMG).astype(np.int32)
    return OfflineCandidates(save(tmp_path / "i2t.npy", i2t), save(tmp_path / "t2i.npy", t2i), N_IMG, OFF)


def test_sample_follows_the_aoq_index_rule(tmp_path):
    cands = coded_candidates(tmp_path)
    caps = np.tile(np.arange(5 * N_IMG), 20)  # 3000 draws
    t3, i3, t4, i4 = cands.sample(caps, np.random.default_rng(0))
    for a in (t3, i3, t4, i4):
        assert a.shape == caps.shape
    n = (t3 // 5 - caps // 5) % N_IMG  # caption rank, drawn in the anchor image's row
    assert np.array_equal(t3 % 5, n % 5)  # consistent with the i2t encoding of that rank
    assert n.min() == 0 and n.max() == OFF - 1  # Uniform{0..offline_size-1}: both ends reached
    assert np.bincount(n, minlength=OFF).min() > 3000 / OFF / 3
    rank_i3 = (i3 - caps) % N_IMG  # image rank, drawn in the anchor caption's row
    assert np.array_equal(rank_i3, n // 5)  # the same n serves both directions
    assert np.array_equal(t4 // 5, i3)
    n2 = t4 % 5
    assert set(n2.tolist()) == set(range(5))
    # n2 is drawn independently of n: every (n % 5, n2) combination occurs
    assert len(set(zip((n % 5).tolist(), n2.tolist()))) == 25
    assert np.array_equal(i4, t3 // 5)


def test_sample_is_deterministic_for_a_seed(tmp_path):
    cands = coded_candidates(tmp_path)
    caps = np.arange(5 * N_IMG)
    a = cands.sample(caps, np.random.default_rng(7))
    b = cands.sample(caps, np.random.default_rng(7))
    c = cands.sample(caps, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "which, shape, dtype",
    [
        ("i2t", (N_IMG + 1, OFF), np.int32),  # wrong number of rows
        ("i2t", (N_IMG, OFF - 1), np.int32),  # too few columns
        ("i2t", (N_IMG, OFF), np.int64),  # wrong dtype
        ("t2i", (5 * N_IMG - 1, 5), np.int32),
        ("t2i", (5 * N_IMG, 4), np.int32),  # ceil(23 / 5) = 5 columns needed
        ("t2i", (5 * N_IMG, 5), np.int64),
        ("t2i", (5 * N_IMG,), np.int32),  # not 2-D
    ],
)
def test_candidate_validation_names_the_file(tmp_path, which, shape, dtype):
    good = {"i2t": ((N_IMG, OFF), np.int32), "t2i": ((5 * N_IMG, 5), np.int32)}
    good[which] = (shape, dtype)
    paths = {
        name: save(
            tmp_path / f"bad_{name}_file.npy" if name == which else tmp_path / f"{name}.npy",
            np.zeros(s, dtype=d),
        )
        for name, (s, d) in good.items()
    }
    with pytest.raises(DataError, match=re.escape(str(paths[which]))):
        OfflineCandidates(paths["i2t"], paths["t2i"], N_IMG, OFF)


def test_candidates_of_minimal_shape_are_accepted(tmp_path):
    i2t = save(tmp_path / "i2t.npy", np.zeros((N_IMG, OFF), np.int32))
    t2i = save(tmp_path / "t2i.npy", np.zeros((5 * N_IMG, 5), np.int32))
    assert OfflineCandidates(i2t, t2i, N_IMG, OFF).offline_size == OFF


@pytest.mark.parametrize("n_items, size", [(103, 10), (100, 10), (7, 32)])
def test_epoch_batches_cover_every_item_once(n_items, size):
    batches = epoch_batches(n_items, size, seed=3, epoch=0)
    assert len(batches) == -(-n_items // size)
    assert [len(b) for b in batches[:-1]] == [size] * (len(batches) - 1)
    assert len(batches[-1]) == n_items - size * (len(batches) - 1)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n_items))


def test_epoch_batches_depend_on_seed_and_epoch_only():
    def flat(seed, epoch):
        return np.concatenate(epoch_batches(200, 16, seed, epoch))

    assert np.array_equal(flat(1, 2), flat(1, 2))
    assert not np.array_equal(flat(1, 2), flat(1, 3))
    assert not np.array_equal(flat(1, 2), flat(2, 2))
    assert not np.array_equal(flat(1, 0), np.arange(200))  # shuffled


# ---- TrainBatches over a hand-made split: image row k holds the value k ----
NI, D, K = 8, 3, 6


@pytest.fixture
def store(tmp_path):
    np.save(tmp_path / "train_ims.npy", np.repeat(np.arange(NI, dtype=np.float32), 36 * D).reshape(NI, 36, D))
    tokens = [[f"w{c}_{t}" for t in range(1 + c % 4)] for c in range(5 * NI)]
    words = SPECIAL_TOKENS + sorted({w for ts in tokens for w in ts})
    word2idx = {w: i for i, w in enumerate(words)}
    ids, offsets = encode(tokens, word2idx)
    np.savez(tmp_path / "train_ids.npz", ids=ids, offsets=offsets)
    rng = np.random.default_rng(1)
    i2t = np.stack([rng.permutation(5 * NI)[:K] for _ in range(NI)]).astype(np.int32)  # distinct per row
    t2i = rng.integers(0, NI, size=(5 * NI, 2)).astype(np.int32)
    np.save(tmp_path / "i2t.npy", i2t)
    np.save(tmp_path / "t2i.npy", t2i)
    first_word = {word2idx[f"w{c}_0"]: c for c in range(5 * NI)}
    return dict(
        features=ImageFeatures(tmp_path, SplitInfo("train", NI, 5 * NI, 1, D)),
        captions=CaptionIds(tmp_path / "train_ids.npz"),
        i2t=i2t,
        t2i=t2i,
        expected_ids=lambda c: [START] + [word2idx[w] for w in tokens[c]] + [END],
        decode=lambda row: first_word[int(row[1])],
        candidates=OfflineCandidates(tmp_path / "i2t.npy", tmp_path / "t2i.npy", NI, K),
    )


def dataset(store, offline=True, first_batch=0, seed=5, epoch=2):
    batches = epoch_batches(5 * NI, 6, seed, epoch)  # 7 batches, the last one of 4
    return TrainBatches(
        store["features"],
        store["captions"],
        batches,
        seed,
        epoch,
        store["candidates"] if offline else None,
        first_batch,
    )


def check_captions(store, ids, lengths, caps):
    assert ids.dtype == torch.int64 and lengths.dtype == torch.int64
    assert ids.shape == (len(caps), int(lengths.max()))
    for row, c in enumerate(caps):
        want = store["expected_ids"](int(c))
        assert lengths[row] == len(want)
        assert ids[row].tolist() == want + [0] * (ids.shape[1] - len(want))


def test_anchor_batch_contents(store):
    ds = dataset(store, offline=False)
    assert len(ds) == 7
    seen = []
    for b in range(len(ds)):
        batch = ds[b]
        assert set(batch) == {"index", "images", "ids", "lengths"}
        caps = batch["index"].numpy()
        seen.append(caps)
        assert batch["images"].dtype == torch.float32 and batch["images"].shape == (len(caps), 36, D)
        assert torch.equal(
            batch["images"], torch.from_numpy(caps // 5).float()[:, None, None].expand(-1, 36, D)
        )
        check_captions(store, batch["ids"], batch["lengths"], caps)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(5 * NI))


def test_offline_batch_contents_follow_the_rule(store):
    ds = dataset(store)
    i2t, t2i = store["i2t"], store["t2i"]
    for b in range(len(ds)):
        batch = ds[b]
        caps = batch["index"].numpy()
        t3 = np.array([store["decode"](r) for r in batch["neg_ids"]])
        t4 = np.array([store["decode"](r) for r in batch["pos2_ids"]])
        i3 = batch["neg_images"][:, 0, 0].numpy().astype(int)
        i4 = batch["pos2_images"][:, 0, 0].numpy().astype(int)
        for tensor in ("neg_images", "pos2_images"):
            assert torch.equal(batch[tensor], batch[tensor][:, :1, :1].expand(-1, 36, D))
        check_captions(store, batch["neg_ids"], batch["neg_lengths"], t3)
        check_captions(store, batch["pos2_ids"], batch["pos2_lengths"], t4)
        for c, a3, b3, a4, b4 in zip(caps, t3, i3, t4, i4):
            n = list(i2t[c // 5]).index(a3)  # T3 is an i2t candidate of the anchor image
            assert b3 == t2i[c, n // 5]  # I3 has the coupled rank in the anchor's t2i row
            assert a4 // 5 == b3 and b4 == a3 // 5
        # draws come from default_rng([seed, epoch, batch number])
        want = store["candidates"].sample(caps, np.random.default_rng([5, 2, b]))
        assert all(np.array_equal(x, y) for x, y in zip((t3, i3, t4, i4), want))


def assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resumed_dataset_yields_the_remaining_batches(store):
    full, resumed = dataset(store), dataset(store, first_batch=3)
    assert len(resumed) == len(full) - 3
    for p in range(len(resumed)):
        assert_same_batch(resumed[p], full[3 + p])
    assert not torch.equal(resumed[0]["index"], full[0]["index"])


def test_dataloader_workers_give_the_same_batches(store):
    ds = dataset(store)
    direct = [ds[b] for b in range(len(ds))]
    for workers in (0, 2):
        loaded = list(torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers))
        assert len(loaded) == len(direct)
        for a, b in zip(loaded, direct):
            assert_same_batch(a, b)


def test_candidates_pickle_as_paths_and_reopen_the_files(store):
    """Workers started by spawn get the file paths, not copies of the arrays."""
    candidates = store["candidates"]
    data = pickle.dumps(candidates)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert isinstance(clone.i2t, np.memmap) and isinstance(clone.t2i, np.memmap)
    caps = np.arange(5 * NI)
    for a, b in zip(
        clone.sample(caps, np.random.default_rng(3)), candidates.sample(caps, np.random.default_rng(3))
    ):
        assert np.array_equal(a, b)
