"""Tests for pipeline_steps.data.text: tokenizer, vocabulary, vocab json, ragged id store.

Expected outputs are worked out by hand from the reference rule (strip the raw bytes, lower-case
ASCII letters only, decode UTF-8, nltk word_tokenize), not recomputed with the code under test.
"""

import json

import nltk
import numpy as np
import pytest

from pipeline_steps.data import text
from pipeline_steps.data.precomp import count_lines
from pipeline_steps.data.text import (
    CaptionIds,
    build_vocab,
    encode,
    load_vocab_json,
    make_tokenizer,
    read_caption_lines,
    vocab_json_text,
)

SPECIALS = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}


@pytest.fixture
def no_punkt(monkeypatch, tmp_path):
    """Point nltk at an empty data folder so punkt is certainly absent (the real check runs)."""
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    assert not text.punkt_available()


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"A dog, running fast!", ["a", "dog", ",", "running", "fast", "!"]),
        (b"He doesn't ride.", ["he", "does", "n't", "ride", "."]),
        (b"Two dogs (brown) play; ok?", ["two", "dogs", "(", "brown", ")", "play", ";", "ok", "?"]),
        (b"A man. He rides", ["a", "man.", "he", "rides"]),  # no sentence split: "man." kept
        ("\u00c9T\u00e9 A Caf\u00e9".encode(), ["\u00c9t\u00e9", "a", "caf\u00e9"]),  # 'É' keeps case
        ("CAF\u00c9".encode(), ["caf\u00c9"]),
        (b"  a b  c\r\n", ["a", "b", "c"]),  # CRLF and blanks stripped
        (b"\t\r", []),
    ],
)
def test_fallback_tokenizer_outputs(no_punkt, raw, expected):
    tokenize, name = make_tokenizer("auto")
    assert name == text.TOKENIZER_PRESERVE_LINE == "nltk.word_tokenize(preserve_line=True)"
    assert tokenize(raw) == expected


def test_explicit_preserve_line_and_bad_kinds(no_punkt):
    tokenize, name = make_tokenizer("preserve_line")
    assert name == "nltk.word_tokenize(preserve_line=True)"
    assert tokenize(b"A man. He rides") == ["a", "man.", "he", "rides"]
    with pytest.raises(RuntimeError, match="punkt"):
        make_tokenizer("punkt")
    with pytest.raises(ValueError, match="bogus"):
        make_tokenizer("bogus")


def test_punkt_name_when_available(monkeypatch):
    monkeypatch.setattr(text, "punkt_available", lambda: True)
    _, name = make_tokenizer("auto")
    assert name == "nltk.word_tokenize"


def test_read_caption_lines_raw_bytes(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes(b"A dog\r\n\xc3\x89t\xc3\xa9\n\nlast")
    assert read_caption_lines(path) == [b"A dog", b"\xc3\x89t\xc3\xa9", b"", b"last"]


def test_read_caption_lines_lone_cr_stays_in_caption(tmp_path):
    # The reference reads lines by iterating the binary file (split on b"\n" only) and the
    # validator counts lines the same way; a lone b"\r" inside a caption must not start a new one,
    # or every later caption is shifted against its image.
    path = tmp_path / "caps.txt"
    path.write_bytes(b"a dog\ron grass\nsecond\n")
    lines = read_caption_lines(path)
    assert len(lines) == count_lines(path) == 2
    assert lines == [b"a dog\ron grass", b"second"]


# Hand counts: the 6, a 5, dog 4, cat 4, runs 3, red 1.
TOKENS = [
    ["the", "a", "dog", "cat", "runs"],
    ["the", "a", "dog", "cat", "runs", "red"],
    ["the", "a", "dog", "cat", "runs"],
    ["the", "a", "dog", "cat"],
    ["the", "a"],
    ["the"],
]


@pytest.mark.parametrize(
    "threshold, kept",
    [
        (4, ["the", "a", "cat", "dog"]),  # runs (3) excluded, dog/cat (4) included
        (3, ["the", "a", "cat", "dog", "runs"]),
        (1, ["the", "a", "cat", "dog", "runs", "red"]),
        (7, []),
    ],
)
def test_build_vocab_threshold_and_order(threshold, kept):
    vocab = build_vocab(TOKENS, threshold)
    expected = dict(SPECIALS, **{w: 4 + i for i, w in enumerate(kept)})
    assert vocab == expected
    assert list(vocab) == list(expected)


def test_build_vocab_ignores_special_tokens_in_text():
    vocab = build_vocab([["<unk>", "<pad>", "b"]] * 5, threshold=4)
    assert vocab == dict(SPECIALS, b=4)


def test_vocab_json_round_trip(tmp_path):
    vocab = build_vocab(TOKENS + [["\u00c9t\u00e9"]] * 4, 4)
    path = tmp_path / "vocab.json"
    path.write_text(vocab_json_text(vocab), encoding="utf-8")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {"word2idx", "idx2word", "idx"}
    assert data["idx"] == len(vocab) == 9
    assert data["word2idx"] == vocab
    assert data["idx2word"] == {str(i): w for w, i in vocab.items()}
    assert all(isinstance(k, str) for k in data["idx2word"])
    assert data["idx2word"]["4"] == "the" and data["idx2word"]["0"] == "<pad>"
    assert load_vocab_json(path) == vocab
    assert load_vocab_json(str(path)) == vocab


def _good():
    return {"word2idx": dict(SPECIALS, dog=4, cat=5), "idx": 6}


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "JSON"),
        ("[1, 2, 3]", "object"),
        (json.dumps({"idx2word": {"0": "<pad>"}, "idx": 1}), "word2idx"),
        (json.dumps({"word2idx": ["<pad>"]}), "word2idx"),
        (json.dumps({"word2idx": dict(SPECIALS, dog=4, cat=6)}), "0..5"),  # gap at 5
        (json.dumps({"word2idx": dict(SPECIALS, dog=4, cat=4)}), "0..5"),  # duplicate id
        (json.dumps({"word2idx": dict(SPECIALS, dog=4, cat="5")}), "0..5"),  # not an integer
        (json.dumps({"word2idx": dict(SPECIALS, **{"<pad>": 1, "<start>": 0})}), "<pad>"),
        (json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "dog": 3}}), "<unk>"),
        (json.dumps(dict(_good(), idx=7)), "idx"),
    ],
)
def test_load_vocab_json_errors_name_the_file(tmp_path, content, problem):
    path = tmp_path / "my_vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_vocab_json(path)
    assert "my_vocab.json" in str(info.value)
    assert problem in str(info.value)


def test_load_vocab_json_missing_and_non_utf8(tmp_path):
    for path, data in [(tmp_path / "absent.json", None), (tmp_path / "latin.json", b"\xff{}")]:
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(ValueError, match=path.name):
            load_vocab_json(path)


def test_load_vocab_json_without_idx_is_fine(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"word2idx": dict(SPECIALS, dog=4)}), encoding="utf-8")
    assert load_vocab_json(path) == dict(SPECIALS, dog=4)


def test_encode_and_caption_ids(tmp_path):
    vocab = dict(SPECIALS, a=4, dog=5)
    ids, offsets = encode([["a", "dog"], [], ["zebra", "a"], ["dog"]], vocab)
    assert ids.dtype == np.int32 and offsets.dtype == np.int64
    assert ids.tolist() == [4, 5, 3, 4, 5]
    assert offsets.tolist() == [0, 2, 2, 4, 5]

    path = tmp_path / "x_ids.npz"
    np.savez(path, ids=ids, offsets=offsets)
    store = CaptionIds(path)
    assert len(store) == 4
    assert store.tokens(0).tolist() == [4, 5]
    assert store.tokens(1).tolist() == []
    assert store.tokens(2).tolist() == [3, 4]
    assert store.with_boundaries(1).tolist() == [1, 2]
    assert store.with_boundaries(2).tolist() == [1, 3, 4, 2]
    assert store.with_boundaries(3).tolist() == [1, 5, 2]
    assert store.with_boundaries(3).dtype == np.int64


def test_encode_no_captions():
    ids, offsets = encode([], dict(SPECIALS))
    assert ids.shape == (0,) and offsets.tolist() == [0]
