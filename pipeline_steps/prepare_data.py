"""Validate a SCAN precomp folder, build (or load) the vocabulary and tokenize every caption once.

Inputs:  a precomp folder (`{split}_ims.npy`, `{split}_caps.txt`), optionally a SCAN vocab json.
Outputs (in --out): `vocab.json` (SCAN layout), `{split}_ids.npz` (ragged caption ids: `ids`,
`offsets`), `manifest.json` (per split: images, captions, row layout, feature width; the
tokenizer that made the ids; the vocabulary source).
Every split is validated before anything is written, so bad input leaves no output behind:
image features must be finite, and every caption line used must hold at least one token (an empty
line is refused with its file and line number, not stored as a 0-token caption).

Example:
    python -m pipeline_steps.prepare_data --data results/demo_data/demo_precomp \
        --out results/prepared/demo_precomp --img-dim 128 --splits train dev test testall
"""

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np

from pipeline_steps.common.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.errors import one_line_errors
from pipeline_steps.data.precomp import validate_split
from pipeline_steps.data.reference_files import load_vocab_pickle
from pipeline_steps.data.text import (
    build_vocab,
    encode,
    load_vocab_json,
    make_tokenizer,
    read_caption_lines,
    vocab_json_text,
)

log = logging.getLogger("prepare_data")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="precomp folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--img-dim", type=int, required=True, help="expected feature width D")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    parser.add_argument(
        "--dataset-name",
        default=None,
        help="coco_precomp / f30k_precomp: also check the release's split sizes",
    )
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-json", default=None, help="use this SCAN vocab json instead of building one")
    vocab.add_argument(
        "--vocab-pkl",
        default=None,
        help="use this VSRN/AOQ vocabulary pickle (Python 2, loaded without unpickling code)",
    )
    parser.add_argument("--vocab-threshold", type=int, default=4)
    parser.add_argument("--tokenizer", choices=["auto", "punkt", "preserve_line"], default="auto")
    return parser.parse_args(argv)


def _refuse_blank_lines(path, lines):
    """SystemExit naming the first empty (or whitespace-only) caption line, 1-based.

    Stored, it would silently become a 0-token caption (the text encoder sees only <start> <end>)
    paired with an image; in SCAN's release an empty line means a damaged or misaligned file.
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():  # the tokenizer strips the same ASCII whitespace
            raise SystemExit(f"error: {path}: line {number} is an empty caption")


def _tokenize_captions(path, lines, tokenize):
    """Token lists of `lines`; SystemExit naming the line of a caption that is not UTF-8 or that
    tokenizes to nothing (e.g. only non-ASCII spaces such as U+00A0, which strip() keeps)."""
    token_lists = []
    for number, line in enumerate(lines, start=1):
        try:
            tokens = tokenize(line)
        except UnicodeDecodeError as err:
            raise SystemExit(f"error: {path}: line {number}: caption is not valid UTF-8 ({err})") from None
        if not tokens:
            raise SystemExit(f"error: {path}: line {number} is an empty caption (no tokens)")
        token_lists.append(tokens)
    return token_lists


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    remove_stale_temporaries(
        out / "vocab.json", out / "manifest.json", *(out / f"{split}_ids.npz" for split in args.splits)
    )
    if "train" not in args.splits:
        raise SystemExit("--splits must include train")
    try:
        infos = {
            s: validate_split(args.data, s, args.img_dim, dataset=args.dataset_name) for s in args.splits
        }
        word2idx = None
        if args.vocab_json:
            word2idx = load_vocab_json(args.vocab_json)
        elif args.vocab_pkl:
            word2idx = load_vocab_pickle(args.vocab_pkl)
    except ValueError as err:  # a DataError, or a malformed vocabulary json
        raise SystemExit(f"error: {err}") from None

    captions = {}
    for split in infos:  # the cheap check of every split before any tokenizing
        path = Path(args.data) / f"{split}_caps.txt"
        captions[split] = (path, read_caption_lines(path))
        _refuse_blank_lines(*captions[split])
    tokenize, tokenizer_name = make_tokenizer(args.tokenizer)
    tokens = {}  # every line of the file; the ids keep the lines a split uses (dev: the first 5,000)
    for split, (path, lines) in captions.items():
        tokens[split] = _tokenize_captions(path, lines, tokenize)
        log.info("tokenized %s: %d captions", split, len(lines))
    if word2idx is None:
        # The reference's rule (docs/data.md): counts over all of train_caps.txt and dev_caps.txt,
        # also the dev captions past the 5,000 that validation uses (Flickr30K has 5,070).
        counted = tokens["train"] + tokens.get("dev", [])
        word2idx = build_vocab(counted, args.vocab_threshold)
        vocab_source = f"built: count >= {args.vocab_threshold} over train+dev"
    else:
        vocab_source = f"loaded: {args.vocab_json or args.vocab_pkl}"

    out.mkdir(parents=True, exist_ok=True)
    vocab_text = vocab_json_text(word2idx)
    manifest = {
        "data": str(args.data),
        "tokenizer": tokenizer_name,
        "vocab": vocab_source,
        "vocab_size": len(word2idx),
        # Checkpoints record it, and evaluate compares: a model evaluated with another
        # vocabulary's ids would give wrong metrics without a word.
        "vocab_sha256": hashlib.sha256(vocab_text.encode("utf-8")).hexdigest(),
        "splits": {},
    }
    for split, token_lists in tokens.items():
        ids, offsets = encode(token_lists[: infos[split].n_captions], word2idx)
        with atomic_path(out / f"{split}_ids.npz") as tmp:
            np.savez(tmp, ids=ids, offsets=offsets)
        unk_rate = float((ids == 3).mean()) if len(ids) else 0.0
        manifest["splits"][split] = infos[split].as_dict() | {"unk_rate": round(unk_rate, 5)}
    write_text_atomic(out / "vocab.json", vocab_text)
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    log.info("vocabulary %d words (%s); tokenizer %s", len(word2idx), vocab_source, tokenizer_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
