"""The mining audit (pipeline_steps/retrieval/audit.py, audit_mining.py) against per-anchor loops
over a brute-force score matrix, on data small enough to check by hand."""

import json

import h5py
import numpy as np
import pytest

from pipeline_steps import audit_mining
from pipeline_steps.data.batches import epoch_batches
from pipeline_steps.retrieval import audit

N_IMG, PER, DIM, BATCH, OFFLINE = 14, 5, 8, 16, 20


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(3)
    images = rng.normal(size=(N_IMG, DIM)).astype(np.float32)
    captions = (np.repeat(images, PER, axis=0) + rng.normal(size=(N_IMG * PER, DIM))).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    # Token ids drawn from a tiny vocabulary, so that some captions repeat across images.
    tokens = [rng.integers(1, 4, size=rng.integers(1, 4)).astype(np.int32) for _ in range(N_IMG * PER)]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
    np.savez(root / "train_ids.npz", ids=np.concatenate(tokens), offsets=offsets)
    scores = images @ captions.T
    i2t = np.stack(
        [[c for c in np.argsort(-scores[i], kind="stable") if c // PER != i] for i in range(N_IMG)]
    )
    t2i = np.stack(
        [[i for i in np.argsort(-scores[:, c], kind="stable") if i != c // PER] for c in range(N_IMG * PER)]
    )
    np.save(root / "i2t.npy", i2t[:, :40].astype(np.int32))
    np.save(root / "t2i.npy", t2i.astype(np.int32))
    # A second miner: the same ranking with its first few columns rotated out.
    np.save(root / "i2t_b.npy", np.roll(i2t, -3, axis=1)[:, :40].astype(np.int32))
    np.save(root / "t2i_b.npy", np.roll(t2i, -1, axis=1).astype(np.int32))
    with h5py.File(root / "emb.h5", "w") as h5:
        h5["images"], h5["captions"] = images, captions
    family = rng.integers(0, 5, size=N_IMG)
    (root / "meta.json").write_text(json.dumps({"splits": {"train": {"family": family.tolist()}}}))
    argv = [
        "--embeddings",
        str(root / "emb.h5"),
        "--i2t",
        str(root / "i2t.npy"),
        "--t2i",
        str(root / "t2i.npy"),
    ]
    argv += ["--caption-ids", str(root / "train_ids.npz"), "--demo-meta", str(root / "meta.json")]
    argv += ["--batch-size", str(BATCH), "--offline-size", str(OFFLINE), "--seed", "4", "--block-mb", "0"]
    argv += ["--compare-i2t", str(root / "i2t_b.npy"), "--compare-t2i", str(root / "t2i_b.npy")]
    argv += ["--out-json", str(root / "audit.json"), "--out-png", str(root / "audit.png")]
    assert audit_mining.main(argv) == 0
    result = json.loads((root / "audit.json").read_text())
    tokens = [tuple(t) for t in tokens]
    return dict(
        root=root, result=result, scores=scores, i2t=i2t[:, :40], t2i=t2i, tokens=tokens, family=family
    )


def online_hardest_by_loops(scores):
    """Per pair (caption c, image c // 5): hardest in-batch negative, both directions."""
    i2t, t2i = {}, {}
    for batch in epoch_batches(N_IMG * PER, BATCH, 4, 0):
        for c in batch:
            i = c // PER
            i2t[c] = max((scores[i, d] for d in batch if d // PER != i), default=-np.inf)
            t2i[c] = max((scores[d // PER, c] for d in batch if d // PER != i), default=-np.inf)
    return i2t, t2i


def test_hardness_matches_loops(case):
    result, scores, i2t, t2i = case["result"], case["scores"], case["i2t"], case["t2i"]
    for r in (1, 10):
        expected = [scores[i, i2t[i, r - 1]] for i in range(N_IMG)]
        assert result["i2t"]["scores_at_rank"][str(r)]["p50"] == pytest.approx(np.median(expected), abs=1e-5)
        expected = [scores[t2i[c, r - 1], c] for c in range(N_IMG * PER)]
        assert result["t2i"]["scores_at_rank"][str(r)]["p25"] == pytest.approx(
            np.quantile(expected, 0.25), abs=1e-5
        )
    assert set(result["i2t"]["scores_at_rank"]) == {"1", "10"}  # ranks beyond the file's 40 columns dropped
    on_i2t, on_t2i = online_hardest_by_loops(scores)
    assert result["i2t"]["online_hardest"]["mean"] == pytest.approx(np.mean(list(on_i2t.values())), abs=1e-5)
    assert result["t2i"]["online_hardest"]["p95"] == pytest.approx(
        np.quantile(list(on_t2i.values()), 0.95), abs=1e-5
    )
    # The offline rank of each pair's online hardest negative: 1 + candidates above it.
    ranks = [
        1 + sum(scores[c // PER, x] > on_i2t[c] + 1e-5 for x in i2t[c // PER, :20])
        for c in range(N_IMG * PER)
    ]
    assert result["i2t"]["online_hardest_offline_rank"]["median"] == np.median(ranks)
    assert result["i2t"]["sorted_rows_share"] == 1.0 and result["t2i"]["sorted_rows_share"] == 1.0


def test_false_negative_shares_match_loops(case):
    result, scores, i2t, t2i, tokens = (
        case["result"],
        case["scores"],
        case["i2t"],
        case["t2i"],
        case["tokens"],
    )
    top_t2i = -(-OFFLINE // PER)
    own = lambda i: {tokens[i * PER + p] for p in range(PER)}  # noqa: E731
    dup = [tokens[c] in own(i) for i in range(N_IMG) for c in i2t[i, :OFFLINE]]
    assert 0 < np.mean(dup) < 1  # the case exercises both outcomes
    assert result["i2t"]["duplicate_caption_share"] == pytest.approx(np.mean(dup))
    dup = [tokens[c] in own(j) for c in range(N_IMG * PER) for j in t2i[c, :top_t2i]]
    assert result["t2i"]["duplicate_caption_share"] == pytest.approx(np.mean(dup))
    above = [
        np.mean(
            [np.mean([scores[i, c] > scores[i, i * PER + p] for c in i2t[i, :OFFLINE]]) for p in range(PER)]
        )
        for i in range(N_IMG)
    ]
    assert result["i2t"]["above_positive_share"] == pytest.approx(np.mean(above))
    above = [scores[j, c] > scores[c // PER, c] for c in range(N_IMG * PER) for j in t2i[c, :top_t2i]]
    assert result["t2i"]["above_positive_share"] == pytest.approx(np.mean(above))
    assert result["duplicate_caption_groups"] == N_IMG * PER - len(set(tokens))


def test_family_recall_and_overlap_match_sets(case):
    result, i2t, t2i, family = case["result"], case["i2t"], case["t2i"], case["family"]
    found = relatives = 0
    for i in range(N_IMG):
        members = {j for j in range(N_IMG) if family[j] == family[i] and j != i}
        found += len(members & {c // PER for c in i2t[i, :OFFLINE]})
        relatives += len(members)
    assert result["i2t"]["family_recall"] == pytest.approx(found / relatives)
    found = relatives = 0
    for c in range(N_IMG * PER):
        members = {j for j in range(N_IMG) if family[j] == family[c // PER] and j != c // PER}
        found += len(members & set(t2i[c, :4]))
        relatives += len(members)
    assert result["t2i"]["family_recall"] == pytest.approx(found / relatives)
    other = np.roll(i2t, -3, axis=1)
    expected = np.mean([len(set(i2t[i, :OFFLINE]) & set(other[i, :OFFLINE])) / OFFLINE for i in range(N_IMG)])
    assert result["overlap"]["i2t"] == pytest.approx(expected)
    other = np.roll(t2i, -1, axis=1)
    expected = np.mean([len(set(t2i[c, :4]) & set(other[c, :4])) / 4 for c in range(N_IMG * PER)])
    assert result["overlap"]["t2i"] == pytest.approx(expected)
    assert (case["root"] / "audit.png").read_bytes()[:4] == b"\x89PNG"


def test_candidates_of_another_split_are_refused_in_one_line(case, tmp_path):
    root = case["root"]
    np.save(tmp_path / "short.npy", np.zeros((N_IMG - 1, 40), dtype=np.int32))
    argv = [
        "--embeddings",
        str(root / "emb.h5"),
        "--i2t",
        str(tmp_path / "short.npy"),
        "--t2i",
        str(root / "t2i.npy"),
    ]
    argv += ["--caption-ids", str(root / "train_ids.npz"), "--out-json", str(tmp_path / "a.json")]
    argv += ["--out-png", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit, match=r"short.npy: expected 14 rows \(one per training image\)"):
        audit_mining.main(argv)
    assert not (tmp_path / "a.json").exists()


def test_excluding_duplicates_gives_the_top_k_of_the_rest(case, tmp_path):
    """mine_candidates --exclude-duplicates against a per-anchor sort of the score matrix with
    the duplicates of the anchor's positives left out."""
    from pipeline_steps import mine_candidates

    root, scores, tokens = case["root"], case["scores"], case["tokens"]
    out_i2t, out_t2i = tmp_path / "i2t.npy", tmp_path / "t2i.npy"
    argv = ["--embeddings", str(root / "emb.h5"), "--out-i2t", str(out_i2t), "--out-t2i", str(out_t2i)]
    argv += ["--k-i2t", "25", "--k-t2i", "6", "--exclude-duplicates", str(root / "train_ids.npz")]
    assert mine_candidates.main(argv) == 0
    own = lambda i: {tokens[i * PER + p] for p in range(PER)}  # noqa: E731
    for i in range(N_IMG):
        kept = [c for c in np.argsort(-scores[i]) if c // PER != i and tokens[c] not in own(i)]
        assert np.load(out_i2t)[i].tolist() == kept[:25], i
    for c in range(N_IMG * PER):
        kept = [j for j in np.argsort(-scores[:, c]) if j != c // PER and tokens[c] not in own(j)]
        assert np.load(out_t2i)[c].tolist() == kept[:6], c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i2t.npy", "t2i.npy"]  # no scratch left
    # The unfiltered candidates do hold duplicates, so the filter was exercised.
    assert (
        case["result"]["i2t"]["duplicate_caption_share"] > 0
        and case["result"]["t2i"]["duplicate_caption_share"] > 0
    )
    argv[argv.index("--k-i2t") + 1] = str(N_IMG * PER - PER)  # every other caption: none may go
    with pytest.raises(SystemExit, match=r"i2t: k=65, but an anchor has only \d+ candidates left"):
        mine_candidates.main(argv)


def test_duplicate_counts_match_loops(case):
    from pipeline_steps.retrieval.exclusion import duplicate_counts

    tokens = case["tokens"]
    groups = audit.caption_groups(
        *(lambda z: (z["ids"], z["offsets"]))(np.load(case["root"] / "train_ids.npz"))
    )
    per_image, per_caption = duplicate_counts(groups)
    own = lambda i: {tokens[i * PER + p] for p in range(PER)}  # noqa: E731
    assert per_image.tolist() == [
        sum(tokens[c] in own(i) for c in range(N_IMG * PER) if c // PER != i) for i in range(N_IMG)
    ]
    assert per_caption.tolist() == [
        sum(tokens[c] in own(j) for j in range(N_IMG) if j != c // PER) for c in range(N_IMG * PER)
    ]
