"""Train the SentencePiece tokenizer on the captions of a set of shards.

    python tools/train_tokenizer.py --shards 'demo_data/train/shard-{000000..000007}.tar' \
        --out demo_data/tokenizer.model --vocab-size 256

An existing model at --out is reused unless --force is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megamm.config import DataConfig, TextConfig
from megamm.data import Tokenizer, expand_shards, iter_captions, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    data_defaults, text_defaults = DataConfig(), TextConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=data_defaults.train_shards,
                        help="brace pattern, glob, directory or comma list of .tar shards")
    parser.add_argument("--out", default=data_defaults.tokenizer, help="output .model file")
    parser.add_argument("--vocab-size", type=int, default=text_defaults.vocab_size,
                        help="target vocabulary size (a soft limit; must not exceed model.text.vocab_size)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--force", action="store_true", help="retrain even if --out exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    try:
        if out.exists() and not args.force:
            action = "reused existing"
        else:
            shards = expand_shards(args.shards, "--shards")
            train_tokenizer(iter_captions(shards), out, args.vocab_size, model_type=args.model_type)
            action = f"trained in {time.perf_counter() - start:.1f} s:"
        tokenizer = Tokenizer(out, field_name="--out")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{action} tokenizer {out} (vocab size {tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
