"""Tests for pipeline_steps.data.reference_files on files built here the way Python 2 /
PyTorch 0.4.1 wrote them (protocol 2, py2 `str` as BINSTRING opcodes, legacy torch format)."""

import argparse
import builtins
import os
import pickle
import struct
import sys
import types
from collections import OrderedDict

import pytest
import torch

from pipeline_steps.data.reference_files import (
    ReferenceFileError,
    convert_vocab_pickle_to_json,
    load_reference_checkpoint,
    load_vocab_pickle,
)
from pipeline_steps.data.text import load_vocab_json

WORDS = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4, "caf\u00e9": 5, "a": 6}


class Py2Pickler(pickle._Pickler):
    """Writes bytes (and, with all_str, str) as py2 `str` opcodes, OrderedDict the py2 way."""

    dispatch = dict(pickle._Pickler.dispatch)
    all_str = False

    def save_py2_str(self, obj):
        data = obj.encode("utf-8") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_str(self, obj):
        if self.all_str and obj.isascii():
            self.save_py2_str(obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_str

    def reducer_override(self, obj):
        if type(obj) is OrderedDict:  # py2: (cls, ([[k, v], ...],), inst_dict)
            state = dict(vars(obj))
            return (OrderedDict, ([[k, v] for k, v in obj.items()],)) + ((state,) if state else ())
        return NotImplemented


class Py2StrPickler(Py2Pickler):
    all_str = True  # identifiers and keys were py2 str as well


PY2_PICKLE = types.SimpleNamespace(  # a pickle_module for torch.save
    __name__="py2pickle",
    Pickler=Py2StrPickler,
    dump=lambda obj, f, protocol=2: Py2StrPickler(f, protocol).dump(obj),
)


def write_vocab_pickle(path, module, monkeypatch):
    class Vocabulary:
        pass

    Vocabulary.__module__ = module
    Vocabulary.__name__ = Vocabulary.__qualname__ = "Vocabulary"
    if module != "__main__":
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(Vocabulary=Vocabulary))
    else:
        monkeypatch.setattr(sys.modules["__main__"], "Vocabulary", Vocabulary, raising=False)
    vocab = Vocabulary()
    vocab.word2idx = {(w.encode() if w.startswith("<") else w): i for w, i in WORDS.items()}
    vocab.idx2word = {i: w for w, i in vocab.word2idx.items()}
    vocab.idx = len(WORDS)
    with open(path, "wb") as handle:
        Py2StrPickler(handle, 2).dump(vocab)  # attribute names are py2 str too


@pytest.mark.parametrize("module", ["vocab", "__main__"])
def test_vocab_pickle_loads_and_converts(tmp_path, monkeypatch, module):
    pkl = tmp_path / "f30k_precomp_vocab.pkl"
    write_vocab_pickle(pkl, module, monkeypatch)
    data = pkl.read_bytes()
    assert b"U\x05<pad>" in data and f"c{module}\nVocabulary".encode() in data  # py2 str, GLOBAL
    assert load_vocab_pickle(pkl) == WORDS
    out = tmp_path / "vocab" / "f30k_precomp_vocab.json"
    assert convert_vocab_pickle_to_json(pkl, out) == WORDS
    assert load_vocab_json(out) == WORDS
    assert sorted(p.name for p in out.parent.iterdir()) == ["f30k_precomp_vocab.json"]


def test_vocab_pickle_bad_contents_name_the_file(tmp_path, monkeypatch):
    pkl = tmp_path / "v.pkl"
    write_vocab_pickle(pkl, "vocab", monkeypatch)
    bad = pkl.read_bytes().replace(b"U\x05<pad>", b"U\x05<pud>")
    (tmp_path / "bad.pkl").write_bytes(bad)
    with pytest.raises(ReferenceFileError, match=r"bad\.pkl.*'<pad>'"):
        load_vocab_pickle(tmp_path / "bad.pkl")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"word2idx": WORDS}))
    with pytest.raises(ReferenceFileError, match=r"plain\.pkl.*Vocabulary"):
        load_vocab_pickle(tmp_path / "plain.pkl")
    (tmp_path / "cut.pkl").write_bytes(pkl.read_bytes()[:40])
    with pytest.raises(ReferenceFileError, match=r"cut\.pkl"):
        load_vocab_pickle(tmp_path / "cut.pkl")


class Evil:
    """Unpickling this runs `func(arg)`; the arg creates the marker file."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def payloads(marker):
    """(callable, argument, regex of the refused global's name as the pickle spells it)."""
    code = f"open({str(marker)!r}, 'w').close()"
    return [
        (builtins.exec, code, r"(builtins|__builtin__)\.exec"),
        (builtins.eval, code, r"(builtins|__builtin__)\.eval"),
        (os.system, f"touch '{marker}'", rf"{os.system.__module__}\.system"),
    ]


def test_malicious_vocab_pickle_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "pwned"
    for func, arg, name in payloads(marker):
        pickle.loads(pickle.dumps(Evil(func, arg), protocol=2))  # sanity: the payload works
        assert marker.exists()
        marker.unlink()
        for n, obj in enumerate([Evil(func, arg), {"word2idx": Evil(func, arg)}]):
            path = tmp_path / f"evil{n}.pkl"
            path.write_bytes(pickle.dumps(obj, protocol=2))
            with pytest.raises(ReferenceFileError, match=rf"evil{n}\.pkl.*refused global {name}"):
                load_vocab_pickle(path)
            assert not marker.exists()


def make_checkpoint(opt_data_name=b"f30k_precomp"):
    img = OrderedDict(
        [
            ("fc.weight", torch.randn(4, 3)),
            ("fc.bias", torch.zeros(4)),
            ("bn.num_batches_tracked", torch.tensor(7)),
        ]
    )
    img._metadata = OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    txt = OrderedDict([("embed.weight", torch.randn(7, 5)), ("rnn.weight_hh_l0", torch.randn(6, 2))])
    opt = argparse.Namespace(
        data_name=opt_data_name,
        embed_size=16,
        margin=0.2,
        max_violation=True,
        vocab_path="./vocab/",
        lr_update=[15],
    )
    return {"epoch": 3, "model": [img, txt], "best_rsum": 420.5, "opt": opt, "Eiters": 1000}


def check_loaded(got, ckpt):
    assert (got["epoch"], got["best_rsum"], got["eiters"]) == (3, 420.5, 1000)
    assert got["opt"] == {
        "data_name": "f30k_precomp",
        "embed_size": 16,
        "margin": 0.2,
        "max_violation": True,
        "vocab_path": "./vocab/",
        "lr_update": [15],
    }
    assert len(got["model"]) == 2
    for state, expected in zip(got["model"], ckpt["model"]):
        assert list(state) == list(expected)
        assert all(type(k) is str for k in state)
        for key in state:
            assert state[key].dtype == expected[key].dtype
            assert torch.equal(state[key], expected[key])
    assert got["model"][0]._metadata["bn"] == {"version": 2}


@pytest.mark.parametrize("how", ["legacy-py2-latin1", "legacy-py2-bytes", "legacy-py3", "zip"])
def test_checkpoint_layouts_load(tmp_path, how):
    ckpt, path = make_checkpoint(), tmp_path / "model_best.pth.tar"
    encoding = "bytes" if how.endswith("bytes") else "latin1"
    if how.startswith("legacy-py2"):  # every ASCII str written as a py2 str, as Python 2 did
        torch.save(
            ckpt, path, _use_new_zipfile_serialization=False, pickle_protocol=2, pickle_module=PY2_PICKLE
        )
        assert b"U\tdata_name" in path.read_bytes() and not path.read_bytes().startswith(b"PK")
    elif how == "legacy-py3":  # bytes value pickled through _codecs.encode
        torch.save(ckpt, path, _use_new_zipfile_serialization=False, pickle_protocol=2)
    else:
        torch.save(ckpt, path)
        assert path.read_bytes().startswith(b"PK")
    check_loaded(load_reference_checkpoint(path, encoding=encoding), ckpt)


class CustomThing:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("legacy", [True, False])
def test_checkpoint_with_disallowed_objects_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    bad_objects = [(CustomThing(), rf"{__name__}\.CustomThing")]
    bad_objects += [(Evil(f, a), name) for f, a, name in payloads(marker)]
    for n, (obj, name) in enumerate(bad_objects):
        ckpt = make_checkpoint()
        ckpt["opt"].extra = obj
        path = tmp_path / f"bad{n}.pth.tar"
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=2)
        with pytest.raises(ReferenceFileError, match=rf"bad{n}\.pth\.tar: refused global {name}"):
            load_reference_checkpoint(path)
        assert not marker.exists()


def test_checkpoint_bad_files_name_the_file(tmp_path):
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(ReferenceFileError, match=r"junk\.pth\.tar"):
        load_reference_checkpoint(tmp_path / "junk.pth.tar")
    torch.save({"epoch": 1, "model": [{"w": [1, 2]}]}, tmp_path / "nolist.pth")
    with pytest.raises(ReferenceFileError, match=r"nolist\.pth: model\[0\] entry 'w'"):
        load_reference_checkpoint(tmp_path / "nolist.pth")
    with pytest.raises(ReferenceFileError, match=r"missing\.pth"):
        load_reference_checkpoint(tmp_path / "missing.pth")
    ckpt = make_checkpoint()
    ckpt["opt"].logger_name = "runs/" + "x" * 300  # py2 BINSTRING: torch's weights-only gap
    torch.save(
        ckpt,
        tmp_path / "long.pth",
        _use_new_zipfile_serialization=False,
        pickle_protocol=2,
        pickle_module=PY2_PICKLE,
    )
    with pytest.raises(ReferenceFileError, match=r"long\.pth: refused pickle content.*BINSTRING"):
        load_reference_checkpoint(tmp_path / "long.pth")
