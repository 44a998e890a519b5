"""Validate a SCAN precomp folder, build (or load) the vocabulary and tokenize every caption once.

Inputs:  a precomp folder (`{split}_ims.npy`, `{split}_caps.txt`), optionally a SCAN vocab json.
Outputs (in --out): `vocab.json` (SCAN layout), `{split}_ids.npz` (ragged caption ids: `ids`,
`offsets`), `manifest.json` (per split: images, captions, row layout, feature width; the
tokenizer that made the ids; the vocabulary source).
Every split is validated before anything is written, so bad input leaves no output behind.

Example:
    python -m pipeline_steps.prepare_data --data results/demo_data/demo_precomp \
        --out results/prepared/demo_precomp --img-dim 128 --splits train dev test testall
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from pipeline_steps.common.atomic import atomic_path, write_text_atomic
from pipeline_steps.common.precomp import DataError, validate_split
from pipeline_steps.common.reference_files import load_vocab_pickle
from pipeline_steps.common.text import (build_vocab, encode, load_vocab_json, make_tokenizer,
                                        read_caption_lines, vocab_json_text)

log = logging.getLogger("prepare_data")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="precomp folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--img-dim", type=int, required=True, help="expected feature width D")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    parser.add_argument("--dataset-name", default=None,
                        help="coco_precomp / f30k_precomp: also check the release's split sizes")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab-json", default=None, help="use this SCAN vocab json instead of building one")
    vocab.add_argument("--vocab-pkl", default=None,
                       help="use this VSRN/AOQ vocabulary pickle (Python 2, loaded without unpickling code)")
    parser.add_argument("--vocab-threshold", type=int, default=4)
    parser.add_argument("--tokenizer", choices=["auto", "punkt", "preserve_line"], default="auto")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if "train" not in args.splits:
        raise SystemExit("--splits must include train")
    try:
        infos = {s: validate_split(args.data, s, args.img_dim, dataset=args.dataset_name)
                 for s in args.splits}
        word2idx = None
        if args.vocab_json:
            word2idx = load_vocab_json(args.vocab_json)
        elif args.vocab_pkl:
            word2idx = load_vocab_pickle(args.vocab_pkl)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:  # malformed vocabulary json
        raise SystemExit(f"error: {err}") from None

    tokenize, tokenizer_name = make_tokenizer(args.tokenizer)
    tokens = {}
    for split, info in infos.items():
        path = Path(args.data) / f"{split}_caps.txt"
        lines = read_caption_lines(path)[:info.n_captions]
        try:
            tokens[split] = [tokenize(line) for line in lines]
        except UnicodeDecodeError as err:
            raise SystemExit(f"error: {path}: caption is not valid UTF-8 ({err})") from None
        log.info("tokenized %s: %d captions", split, len(lines))
    if word2idx is None:
        # Reference rule: counts over train + dev (all dev captions the loader uses).
        counted = tokens["train"] + tokens.get("dev", [])
        word2idx = build_vocab(counted, args.vocab_threshold)
        vocab_source = f"built: count >= {args.vocab_threshold} over train+dev"
    else:
        vocab_source = f"loaded: {args.vocab_json or args.vocab_pkl}"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"data": str(args.data), "tokenizer": tokenizer_name, "vocab": vocab_source,
                "vocab_size": len(word2idx), "splits": {}}
    for split, token_lists in tokens.items():
        ids, offsets = encode(token_lists, word2idx)
        with atomic_path(out / f"{split}_ids.npz") as tmp:
            np.savez(tmp, ids=ids, offsets=offsets)
        unk_rate = float((ids == 3).mean()) if len(ids) else 0.0
        manifest["splits"][split] = infos[split].as_dict() | {"unk_rate": round(unk_rate, 5)}
    write_text_atomic(out / "vocab.json", vocab_json_text(word2idx))
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    log.info("vocabulary %d words (%s); tokenizer %s", len(word2idx), vocab_source, tokenizer_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
