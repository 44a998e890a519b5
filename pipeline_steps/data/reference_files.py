"""Safe loaders for the authors' released files (docs/data.md).

* `{coco,f30k}_precomp_vocab.pkl`: Python-2 pickles of a `Vocabulary` object (module `vocab`, or
  `__main__` in VSE++). Read by a restricted unpickler that maps that class to a stub and refuses
  every other global; py2 byte-string words are decoded as UTF-8 (latin1 fallback).
* `model_best.pth.tar`: PyTorch 0.4.1 / Python 2 checkpoints in the legacy (non-zip) format, a dict
  {epoch, model: [state dicts], best_rsum, opt: argparse.Namespace, Eiters}. Read by torch's own
  weights-only unpickler (it handles the legacy format) with argparse.Namespace as the one extra
  allowed class; zip-format files load the same way.

Nothing else is ever reconstructed: a pickle naming any other global raises ReferenceFileError
naming the file and the refused global, before anything it names is called.
"""

import argparse
import io
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from pipeline_steps.common.atomic import atomic_path
from pipeline_steps.common.errors import InputError
from pipeline_steps.data.text import check_word2idx, load_vocab_json, vocab_json_text


class ReferenceFileError(InputError):
    """A released file is unreadable, malformed or holds an object we refuse to build."""


def _text(value):
    """py2 str arrives as bytes (encoding='bytes'): decode UTF-8, latin1 as a fallback."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).decode("latin1")
    return value


def _plain(value):
    """Recursively decode byte strings inside plain containers (opt values, _metadata)."""
    if isinstance(value, dict):
        return type(value)((_text(k), _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return _text(value)


# ------------------------------------------------------------------------------- vocabulary
class _VocabularyStub:
    """Stands in for the pickled `Vocabulary`; only keeps the attribute dict it is given."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"Vocabulary state is a {type(state).__name__}")
        self.fields = {_text(k): v for k, v in state.items()}


def _reconstructor(cls, base, state):
    """copy_reg._reconstructor (py2 protocols 0/1), limited to `object.__new__(stub)`."""
    if cls is not _VocabularyStub or base is not object or state is not None:
        raise pickle.UnpicklingError("copy_reg._reconstructor only allowed for Vocabulary")
    return _VocabularyStub()


_VOCAB_GLOBALS = {
    ("vocab", "Vocabulary"): _VocabularyStub,
    ("__main__", "Vocabulary"): _VocabularyStub,
    ("collections", "OrderedDict"): OrderedDict,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
}


class _VocabUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _VOCAB_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def load_vocab_pickle(path):
    """word2idx {word: id} of a released `*_vocab.pkl`; ValueError naming the file if not sound."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            obj = _VocabUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as err:
        raise ReferenceFileError(f"{path}: not a safe vocabulary pickle ({err})") from None
    fields = getattr(obj, "fields", None)
    if not isinstance(obj, _VocabularyStub) or not isinstance(fields, dict):
        raise ReferenceFileError(f"{path}: pickle does not hold a Vocabulary object")
    raw = fields.get("word2idx")
    if not isinstance(raw, dict):
        raise ReferenceFileError(f"{path}: Vocabulary has no word2idx dict")
    word2idx = {_text(word): i for word, i in raw.items()}
    if len(word2idx) != len(raw) or not all(isinstance(w, str) for w in word2idx):
        raise ReferenceFileError(f"{path}: word2idx words must be distinct strings")
    check_word2idx(word2idx, path, ReferenceFileError)
    idx2word = fields.get("idx2word")
    if idx2word is not None and (
        not isinstance(idx2word, dict)
        or {i: _text(w) for i, w in idx2word.items()} != {i: w for w, i in word2idx.items()}
    ):
        raise ReferenceFileError(f"{path}: idx2word does not match word2idx")
    if fields.get("idx", len(word2idx)) != len(word2idx):
        raise ReferenceFileError(f"{path}: idx is {fields['idx']} but word2idx has {len(word2idx)} words")
    return word2idx


def convert_vocab_pickle_to_json(pkl_path, json_path):
    """Write the SCAN json layout of a vocabulary pickle atomically; checked by load_vocab_json."""
    word2idx = load_vocab_pickle(pkl_path)
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(vocab_json_text(word2idx), encoding="utf-8")
        if load_vocab_json(tmp) != word2idx:
            raise ReferenceFileError(f"{json_path}: json round trip changed the vocabulary")
    return word2idx


# ------------------------------------------------------------------------------- checkpoints
def _refused_global(message):
    match = re.search(r"GLOBAL ([\w.]+)|unrecognized function (\S+)|got <class '([\w.]+)'>", message)
    name = next((g for g in match.groups() if g), None) if match else None
    return name if name is None or "." in name else f"builtins.{name}"  # torch drops 'builtins.'


def load_reference_checkpoint(path, encoding="latin1"):
    """Load a released checkpoint weights-only: {epoch, best_rsum, eiters, opt, model}.

    `opt` is a plain dict of the Namespace's attributes and `model` a list of state dicts
    (OrderedDict[str, Tensor], `_metadata` kept when present); py2 byte strings are decoded.
    `encoding` is 'latin1' (py2 str -> str) or 'bytes' (py2 str -> bytes, then decoded here).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns that encoding is ignored; it is not
            warnings.filterwarnings("ignore", message="pickle_load_args only works")
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True, encoding=encoding)
    except pickle.UnpicklingError as err:
        message = str(err)
        name = _refused_global(message)
        detail = message.split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        what = f"refused global {name}" if name else "refused pickle content"
        if "Unsupported operand 84" in detail:  # opcode 'T': torch does not read it
            detail += " = BINSTRING, a py2 str of 256+ bytes; needs a converter outside torch"
        raise ReferenceFileError(f"{path}: {what} (weights-only load: {detail})") from None
    except (OSError, RuntimeError, EOFError, ValueError, TypeError) as err:
        raise ReferenceFileError(f"{path}: not a readable checkpoint ({err})") from None
    if not isinstance(raw, dict):
        raise ReferenceFileError(f"{path}: checkpoint is a {type(raw).__name__}, not a dict")
    raw = {_text(k): v for k, v in raw.items()}
    models = raw.get("model")
    if not isinstance(models, (list, tuple)) or not models:
        raise ReferenceFileError(f"{path}: 'model' must be a non-empty list of state dicts")
    model = []
    for n, state in enumerate(models):
        if not isinstance(state, dict):
            raise ReferenceFileError(f"{path}: model[{n}] is a {type(state).__name__}, not a state dict")
        clean = OrderedDict((_text(k), v) for k, v in state.items())
        bad = [k for k, v in clean.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise ReferenceFileError(f"{path}: model[{n}] entry {bad[0]!r} is not a named tensor")
        extra = {_text(k): v for k, v in getattr(state, "__dict__", {}).items()}  # bytes keys too
        if isinstance(extra.get("_metadata"), dict):
            clean._metadata = _plain(extra["_metadata"])
        model.append(clean)
    opt = raw.get("opt")
    if isinstance(opt, argparse.Namespace):
        opt = vars(opt)
    if opt is not None and not isinstance(opt, dict):
        raise ReferenceFileError(f"{path}: 'opt' is a {type(opt).__name__}, not a Namespace")
    return {
        "epoch": raw.get("epoch"),
        "best_rsum": raw.get("best_rsum"),
        "eiters": raw.get("Eiters"),
        "opt": None if opt is None else dict(_plain(opt)),
        "model": model,
    }
