"""Tests for pipeline_steps.prepare_data on small hand-built SCAN precomp folders."""

import json

import nltk
import numpy as np
import pytest

from pipeline_steps import make_demo_data, prepare_data
from pipeline_steps.data import precomp
from pipeline_steps.data.precomp import DataError, ImageFeatures, SplitInfo, validate_split
from pipeline_steps.data.text import CaptionIds

D = 8
# (raw caption line, tokens worked out by hand: strip, ASCII lower-case, word_tokenize per line)
PAIRS = [
    (b"A dog runs on the grass.", ["a", "dog", "runs", "on", "the", "grass", "."]),
    (b"Two Men ride bikes, fast!", ["two", "men", "ride", "bikes", ",", "fast", "!"]),
    (b"  The cat doesn't sleep  ", ["the", "cat", "does", "n't", "sleep"]),
    (b"A man. He rides a horse", ["a", "man.", "he", "rides", "a", "horse"]),
    ("CAF\u00c9 sign (red)".encode(), ["caf\u00c9", "sign", "(", "red", ")"]),
    (b"kids play", ["kids", "play"]),
    (b"\tA red\tball ", ["a", "red", "ball"]),  # empty lines are refused (test_empty_caption_...)
]
ZEBRA = (b"A zebra runs", ["a", "zebra", "runs"])  # only in test: "zebra" is not in the vocabulary
N_IMAGES = {"train": 3, "dev": 2, "test": 2}


@pytest.fixture(autouse=True)
def no_punkt(monkeypatch, tmp_path):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty_nltk_data")])


def _captions(split):
    n = 5 * N_IMAGES[split]
    pairs = [PAIRS[(i + len(split)) % len(PAIRS)] for i in range(n)]
    return pairs if split != "test" else pairs[:-1] + [ZEBRA]


def _write_split(folder, split, feats, caps, eol=b"\n"):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", feats)
    (folder / f"{split}_caps.txt").write_bytes(b"".join(line + eol for line in caps))


def _make_folder(folder, seed=0):
    """train/test one row per image, dev one row per caption (CRLF caption file)."""
    rng = np.random.default_rng(seed)
    per_image = {}
    for split, n in N_IMAGES.items():
        per_image[split] = rng.random((n, 36, D), dtype=np.float32)
        feats = np.repeat(per_image[split], 5, axis=0) if split == "dev" else per_image[split]
        _write_split(
            folder,
            split,
            feats,
            [raw for raw, _ in _captions(split)],
            eol=b"\r\n" if split == "dev" else b"\n",
        )
    return per_image


def _run(data, out, *extra):
    return prepare_data.main(
        ["--data", str(data), "--out", str(out), "--img-dim", str(D), "--vocab-threshold", "1", *extra]
    )


@pytest.fixture
def prepared(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    per_image = _make_folder(data)
    assert _run(data, out) == 0
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    return data, out, per_image, manifest, vocab


def test_outputs_and_manifest(prepared):
    _, out, _, manifest, vocab = prepared
    assert {p.name for p in out.iterdir()} == {
        "vocab.json",
        "manifest.json",
        "train_ids.npz",
        "dev_ids.npz",
        "test_ids.npz",
    }
    assert manifest["tokenizer"] == "nltk.word_tokenize(preserve_line=True)"
    words = {t for s in ("train", "dev") for _, tokens in _captions(s) for t in tokens}
    assert "zebra" not in words and "zebra" not in vocab["word2idx"]
    assert manifest["vocab_size"] == len(vocab["word2idx"]) == 4 + len(words)
    assert set(vocab["word2idx"]) == words | {"<pad>", "<start>", "<end>", "<unk>"}
    for split, n in N_IMAGES.items():
        entry = manifest["splits"][split]
        assert entry["n_images"] == n and entry["n_captions"] == 5 * n
        assert entry["rows_per_image"] == (5 if split == "dev" else 1)
        assert entry["img_dim"] == D and entry["split"] == split
    n_test_tokens = sum(len(tokens) for _, tokens in _captions("test"))
    assert manifest["splits"]["test"]["unk_rate"] == pytest.approx(1 / n_test_tokens, abs=1e-5)
    assert manifest["splits"]["train"]["unk_rate"] == 0


@pytest.mark.parametrize("split", sorted(N_IMAGES))
def test_ids_decode_back_to_tokens(prepared, split):
    _, out, _, _, vocab = prepared
    idx2word = vocab["idx2word"]
    store = CaptionIds(out / f"{split}_ids.npz")
    expected = [[t if t != "zebra" else "<unk>" for t in tokens] for _, tokens in _captions(split)]
    assert len(store) == len(expected)
    assert [[idx2word[str(i)] for i in store.tokens(k)] for k in range(len(store))] == expected


@pytest.mark.parametrize("split", sorted(N_IMAGES))
def test_image_features_rows_both_layouts(prepared, split):
    data, _, per_image, manifest, _ = prepared
    entry = manifest["splits"][split]
    info = SplitInfo(split, entry["n_images"], entry["n_captions"], entry["rows_per_image"], D)
    features = ImageFeatures(data, info)
    raw = np.load(data / f"{split}_ims.npy")
    order = [1, 0, 1] + ([2] if split == "train" else [])
    got = features.rows(order)
    assert len(features) == N_IMAGES[split] and got.dtype == np.float32
    assert np.array_equal(got, raw[np.array(order) * entry["rows_per_image"]])
    assert np.array_equal(got, per_image[split][order])


def test_dev_limited_to_5000_captions_but_the_vocabulary_counts_all(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _write_split(data, "train", np.zeros((1, 36, 2), np.float32), [b"a dog"] * 5)
    caps = [b"a dog"] * 5000 + [b"extra words"] * 25
    _write_split(data, "dev", np.ones((1005, 36, 2), np.float32), caps)
    prepare_data.main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--img-dim",
            "2",
            "--splits",
            "train",
            "dev",
            "--vocab-threshold",
            "1",
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["splits"]["dev"]["n_captions"] == 5000
    assert manifest["splits"]["dev"]["n_images"] == 1000
    assert len(CaptionIds(out / "dev_ids.npz")) == 5000
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))["word2idx"]
    # The reference counts the whole dev_caps.txt for the vocabulary, past the 5,000 it validates on.
    assert "extra" in vocab and "words" in vocab and vocab["a"] == 4


def test_given_vocab_json_used_as_is(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    _make_folder(data)
    given = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "zebra": 4, "dog": 5, "a": 6}
    path = tmp_path / "given.json"
    path.write_text(json.dumps({"word2idx": given, "idx": 7}), encoding="utf-8")
    _run(data, out, "--vocab-json", str(path))
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8"))["word2idx"] == given
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["vocab_size"] == 7 and "given.json" in manifest["vocab"]
    for split in N_IMAGES:
        store = CaptionIds(out / f"{split}_ids.npz")
        for k, (_, tokens) in enumerate(_captions(split)):
            assert store.tokens(k).tolist() == [given.get(t, 3) for t in tokens]


def test_lone_cr_inside_a_caption_does_not_shift_captions(tmp_path):
    # count_lines (validation) and the reference split on b"\n" only; a b"\r" inside caption 0
    # must not push every later caption onto the wrong image.
    data, out = tmp_path / "data", tmp_path / "out"
    _make_folder(data)
    caps = [raw for raw, _ in _captions("train")]
    caps[0] = b"a dog\rruns"
    _write_split(data, "train", np.load(data / "train_ims.npy"), caps)
    _run(data, out)
    idx2word = json.loads((out / "vocab.json").read_text(encoding="utf-8"))["idx2word"]
    store = CaptionIds(out / "train_ids.npz")
    decoded = [[idx2word[str(i)] for i in store.tokens(k)] for k in range(len(store))]
    assert decoded == [["a", "dog", "runs"]] + [t for _, t in _captions("train")[1:]]


def _bad_vocab(data):
    (data / "bad_vocab.json").write_text("{oops", encoding="utf-8")
    return ["--vocab-json", str(data / "bad_vocab.json")]


def _shape(data, split, shape, dtype=np.float32, fill=lambda feats: None):
    feats = np.zeros(shape, dtype)
    fill(feats)
    np.save(data / f"{split}_ims.npy", feats)


def _set(feats):
    feats[7, 0, 0] = 1.0  # image 1, its 3rd of 5 rows differs


BAD = {  # name -> (break the folder, offending file, word about the problem)
    "missing_ims": (lambda d: (d / "test_ims.npy").unlink(), "test_ims.npy", "missing"),
    "missing_caps": (lambda d: (d / "dev_caps.txt").unlink(), "dev_caps.txt", "missing"),
    "caps_not_multiple_of_5": (
        lambda d: (d / "test_caps.txt").write_bytes(b"a\n" * 9),
        "test_caps.txt",
        "multiple of 5",
    ),
    "rows_match_no_layout": (lambda d: _shape(d, "train", (4, 36, D)), "train_ims.npy", "rows"),
    "wrong_width": (lambda d: _shape(d, "test", (2, 36, D + 1)), "test_ims.npy", "img_dim"),
    "float64": (lambda d: _shape(d, "train", (3, 36, D), np.float64), "train_ims.npy", "float32"),
    "35_regions": (lambda d: _shape(d, "dev", (10, 35, D)), "dev_ims.npy", "36"),
    "dev_rows_differ": (lambda d: _shape(d, "dev", (10, 36, D), fill=_set), "dev_ims.npy", "differ"),
    "bad_vocab_json": (_bad_vocab, "bad_vocab.json", "JSON"),
    "caps_not_utf8": (
        lambda d: (d / "test_caps.txt").write_bytes(b"ok\n" * 4 + b"\xe9\n" * 6),
        "test_caps.txt",
        "UTF-8",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(tmp_path, case):
    data, out = tmp_path / "data", tmp_path / "out"
    _make_folder(data)
    breaker, filename, problem = BAD[case]
    extra = breaker(data)
    extra = extra if isinstance(extra, list) else []
    out.mkdir()
    with pytest.raises(SystemExit) as info:
        _run(data, out, *extra)
    message = str(info.value.code)
    assert filename in message and problem in message
    assert list(out.rglob("*")) == []


def test_known_release_split_sizes_are_enforced(tmp_path):
    folder = tmp_path / "coco_precomp"
    folder.mkdir()
    np.save(folder / "test_ims.npy", np.zeros((2, 36, 4), dtype=np.float32))
    (folder / "test_caps.txt").write_text("a cat\n" * 10)
    with pytest.raises(DataError, match="test_caps.txt: 10 captions, but coco_precomp test has 5000"):
        validate_split(folder, "test", 4, dataset="coco_precomp")
    assert validate_split(folder, "test", 4, dataset="demo_precomp").n_images == 2  # unknown: no table


BAD_VALUES = {"NaN": np.nan, "+Inf": np.inf, "-Inf": -np.inf}


@pytest.mark.parametrize("word", sorted(BAD_VALUES))
@pytest.mark.parametrize("split", ["train", "dev"])  # one row per image / one row per caption (dev)
def test_non_finite_features_fail_cleanly(tmp_path, split, word):
    data, out = tmp_path / "data", tmp_path / "out"
    _make_folder(data)
    path = data / f"{split}_ims.npy"
    feats = np.load(path)
    rows = slice(5, 10) if split == "dev" else slice(1, 3)  # dev: all 5 rows of image 1
    feats[rows, 4, 2] = BAD_VALUES[word]
    np.save(path, feats)
    out.mkdir()
    with pytest.raises(SystemExit) as info:
        _run(data, out)
    row = 5 if split == "dev" else 1
    assert info.value.code == f"error: {path}: image 1 (row {row}) holds {word}"
    assert list(out.rglob("*")) == []  # no vocab.json, manifest.json or *_ids.npz


@pytest.mark.parametrize("block_rows", [4, None])  # several blocks (bad ones not the first) / one
@pytest.mark.parametrize("rows_per_image", [1, 5])
@pytest.mark.parametrize("word", sorted(BAD_VALUES))
def test_first_non_finite_image_is_named(tmp_path, word, rows_per_image, block_rows):
    n_images = 13  # 13 or 65 rows: the last block of 4 is partial
    feats = np.repeat(
        np.random.default_rng(0).random((n_images, 36, 4), dtype=np.float32), rows_per_image, axis=0
    )
    caps = [b"a dog"] * (5 * n_images)
    _write_split(tmp_path, "train", feats, caps)
    assert validate_split(tmp_path, "train", 4, block_rows=block_rows).n_images == n_images

    later = feats.copy()
    later[-1, 35, 3] = BAD_VALUES[word]  # the very last value, in the partial last block
    _write_split(tmp_path, "train", later, caps)
    with pytest.raises(DataError) as info:
        validate_split(tmp_path, "train", 4, block_rows=block_rows)
    last = len(feats) - 1
    assert str(info.value) == f"{tmp_path / 'train_ims.npy'}: image {n_images - 1} (row {last}) holds {word}"

    # Bad values in images 6 and 9: image 6 is named, and its first bad value (region 3 before
    # region 20, whatever image 9 holds); with blocks of 4 rows neither is in the first block.
    first_row = 6 * rows_per_image
    feats[first_row : first_row + rows_per_image, 3, 1] = BAD_VALUES[word]
    feats[first_row : first_row + rows_per_image, 20, 0] = np.nan if word != "NaN" else np.inf
    feats[9 * rows_per_image : 10 * rows_per_image, 0, 0] = np.nan
    _write_split(tmp_path, "train", feats, caps)
    with pytest.raises(DataError) as info:
        validate_split(tmp_path, "train", 4, block_rows=block_rows)
    message = str(info.value)
    assert message == f"{tmp_path / 'train_ims.npy'}: image 6 (row {first_row}) holds {word}"
    assert "\n" not in message


def _rss_file_kib():
    """Resident file-backed memory of this process (Linux), in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_finite_check_reads_every_row_without_keeping_it_resident(tmp_path, monkeypatch):
    n, dim = 700, 512  # 700 x 36 x 512 float32 = 52 MB on disk
    feats = np.lib.format.open_memmap(
        tmp_path / "train_ims.npy", mode="w+", dtype=np.float32, shape=(n, 36, dim)
    )
    feats[:, 0, 0] = 1.0
    feats.flush()
    del feats
    (tmp_path / "train_caps.txt").write_bytes(b"a dog\n" * (5 * n))
    file_kib = (tmp_path / "train_ims.npy").stat().st_size // 1024

    def peak_growth(release):
        """Largest RssFile growth seen after each block (the mapping closes when the pass ends)."""
        before, seen = _rss_file_kib(), [0]

        def after_block(array):
            release(array)
            seen.append(_rss_file_kib() - before)

        monkeypatch.setattr(precomp, "release_mapped_pages", after_block)
        validate_split(tmp_path, "train", dim, block_rows=50)  # blocks of 3.7 MB
        return max(seen), len(seen) - 1

    growth_released, blocks = peak_growth(precomp.release_mapped_pages)
    growth_kept, _ = peak_growth(lambda array: None)
    assert blocks == n // 50
    assert growth_kept > file_kib // 2  # the pass does read the whole file
    assert growth_released < file_kib // 4  # and, releasing each block, does not keep it mapped


@pytest.mark.parametrize(
    "split, number, line, problem",
    [
        ("train", 12, b"", "is an empty caption"),
        ("train", 12, b" \t ", "is an empty caption"),
        ("dev", 3, b"  ", "is an empty caption"),  # CRLF file: the b"\r" is not a word either
        ("test", 7, "\u00a0".encode(), "is an empty caption (no tokens)"),  # strip() keeps U+00A0
    ],
    ids=["empty", "whitespace", "crlf-spaces", "nbsp-no-tokens"],
)
def test_empty_caption_fails_cleanly(tmp_path, split, number, line, problem):
    data, out = tmp_path / "data", tmp_path / "out"
    _make_folder(data)
    path = data / f"{split}_caps.txt"
    eol = b"\r\n" if split == "dev" else b"\n"
    caps = path.read_bytes().split(eol)[:-1]
    caps[number - 1] = line
    caps[number] = line  # a second one after it: the first one is named
    path.write_bytes(b"".join(c + eol for c in caps))
    out.mkdir()
    with pytest.raises(SystemExit) as info:
        _run(data, out)
    assert info.value.code == f"error: {path}: line {number} {problem}"
    assert list(out.rglob("*")) == []  # no vocab.json, manifest.json or *_ids.npz


def test_empty_caption_in_generated_demo_data_fails_cleanly(tmp_path):
    data, out = tmp_path / "demo_precomp", tmp_path / "prepared"
    make_demo_data.main(
        [
            "--out",
            str(data),
            "--seed",
            "0",
            "--n-train",
            "20",
            "--n-dev",
            "10",
            "--n-test",
            "10",
            "--n-testall-per-fold",
            "4",
            "--img-dim",
            "16",
        ]
    )
    path = data / "dev_caps.txt"
    lines = path.read_bytes().split(b"\n")
    lines[30] = b""
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(SystemExit) as info:
        prepare_data.main(
            ["--data", str(data), "--out", str(out), "--img-dim", "16", "--splits", "train", "dev", "test"]
        )
    assert info.value.code == f"error: {path}: line 31 is an empty caption"
    assert not out.exists() or list(out.rglob("*")) == []
