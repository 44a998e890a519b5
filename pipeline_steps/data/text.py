"""Tokenisation, vocabulary and the cached caption-id store.

Tokenisation follows the reference (docs/data.md): strip the raw bytes, lower-case ASCII
letters only (`bytes.lower`), decode UTF-8, then `nltk.word_tokenize`. The full tokenizer needs
nltk's punkt data; where it is not installed we use `word_tokenize(text, preserve_line=True)`
(no sentence splitting), which differs only on multi-sentence captions ("a man. he" keeps
"man."). Which one made the ids is recorded with them. nltk data is never downloaded here.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np

PAD, START, END, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<start>", "<end>", "<unk>"]
TOKENIZER_PUNKT = "nltk.word_tokenize"
TOKENIZER_PRESERVE_LINE = "nltk.word_tokenize(preserve_line=True)"


def punkt_available():
    import nltk

    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def make_tokenizer(kind="auto"):
    """Return (tokenize(bytes_line) -> list[str], name). kind: auto | punkt | preserve_line."""
    from nltk.tokenize import word_tokenize

    if kind == "auto":
        kind = "punkt" if punkt_available() else "preserve_line"
    if kind == "punkt":
        if not punkt_available():
            raise RuntimeError("tokenizer 'punkt' asked for, but nltk's punkt data is not installed")
        name, split_lines = TOKENIZER_PUNKT, False
    elif kind == "preserve_line":
        name, split_lines = TOKENIZER_PRESERVE_LINE, True
    else:
        raise ValueError(f"unknown tokenizer {kind!r}")

    def tokenize(raw):
        text = raw.strip().lower().decode("utf-8")  # bytes.lower touches ASCII letters only
        return word_tokenize(text, preserve_line=split_lines)

    return tokenize, name


def read_caption_lines(path):
    """Caption lines of a `{split}_caps.txt` as raw bytes (no decoding yet, see module doc).

    Lines end at b"\n" only, as the reference's line iteration and the validator's count: a
    stray b"\r" inside a caption must not split it (that would shift every later caption).
    """
    with open(path, "rb") as handle:
        lines = handle.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]  # CRLF files


def build_vocab(token_lists, threshold=4):
    """Reference rule: words with count >= threshold; ids 0-3 special, then the kept words.

    The reference orders kept words by Python-2 dict hash order, which cannot be regenerated;
    we use decreasing count, then alphabetical, so a rebuild is deterministic.
    """
    counts = Counter(token for tokens in token_lists for token in tokens)
    kept = sorted(
        (w for w, c in counts.items() if c >= threshold and w not in SPECIAL_TOKENS),
        key=lambda w: (-counts[w], w),
    )
    return {word: i for i, word in enumerate(SPECIAL_TOKENS + kept)}


def vocab_json_text(word2idx):
    """SCAN json layout: word2idx, idx2word (string keys), idx."""
    idx2word = {str(i): w for w, i in word2idx.items()}
    return json.dumps(
        {"word2idx": word2idx, "idx2word": idx2word, "idx": len(word2idx)}, ensure_ascii=False, indent=0
    )


def check_word2idx(word2idx, path, error=ValueError):
    """Ids are exactly 0..V-1 and the special tokens hold 0..3; else `error` naming `path`."""
    ids = sorted(word2idx.values()) if all(type(v) is int for v in word2idx.values()) else None
    if ids != list(range(len(word2idx))):
        raise error(f"{path}: word2idx ids must be the integers 0..{len(word2idx) - 1}, each once")
    for i, token in enumerate(SPECIAL_TOKENS):
        if word2idx.get(token) != i:
            raise error(f"{path}: special token {token!r} must have id {i}")


def load_vocab_json(path):
    """Load and check a SCAN vocab json; raise ValueError naming the file on any problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON vocabulary ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("word2idx"), dict):
        raise ValueError(f"{path}: vocabulary json must be an object with a 'word2idx' object")
    word2idx = data["word2idx"]
    check_word2idx(word2idx, path)
    if "idx" in data and data["idx"] != len(word2idx):
        raise ValueError(f"{path}: 'idx' is {data['idx']} but word2idx has {len(word2idx)} words")
    return word2idx


def encode(token_lists, word2idx):
    """Ragged id store: (ids int32 flat, offsets int64 (n+1,)); unknown words -> <unk>."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter(
        (word2idx.get(tok, UNK) for tokens in token_lists for tok in tokens),
        dtype=np.int32,
        count=int(offsets[-1]),
    )
    return ids, offsets


class CaptionIds:
    """Cached caption ids of one split (`.npz` with `ids`, `offsets`), opened once."""

    def __init__(self, path):
        with np.load(path) as data:
            self.ids = data["ids"]
            self.offsets = data["offsets"]

    def __len__(self):
        return len(self.offsets) - 1

    def tokens(self, index):
        """Word ids of caption `index` (no <start>/<end>)."""
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def with_boundaries(self, index):
        """[<start>] + ids + [<end>], the retrieval encoder's input (no truncation; docs/data.md)."""
        return np.concatenate(([START], self.tokens(index), [END])).astype(np.int64)
