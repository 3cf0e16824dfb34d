"""Train the SentencePiece tokenizer on the captions (and the questions and answers) of a set of shards.

    python tools/train_tokenizer.py --shards 'demo_data/train/shard-{000000..000007}.tar' \
        --out demo_data/tokenizer.model --vocab-size 256

An existing model at --out is reused when it covers the shards' text (no unknown piece in the
first COVERAGE_SAMPLES texts), unless --force is given; one that does not (say, trained on the
captions alone before the data gained questions) is trained again, with a note.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from megamm.config import DataConfig, TextConfig
from megamm.data import UNK_ID, Tokenizer, expand_shards, iter_captions, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    data_defaults, text_defaults = DataConfig(), TextConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=data_defaults.train_shards,
                        help="brace pattern, glob, directory or comma list of .tar shards")
    parser.add_argument("--out", default=data_defaults.tokenizer, help="output .model file")
    parser.add_argument("--vocab-size", type=int, default=text_defaults.vocab_size,
                        help="target vocabulary size (a soft limit; must not exceed model.text.vocab_size)")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--captions-only", action="store_true",
                        help="train on the captions alone, not on the samples' questions and answers (qa.json)")
    parser.add_argument("--force", action="store_true", help="retrain even if --out exists")
    return parser.parse_args(argv)


COVERAGE_SAMPLES = 200
"""Texts an existing model must encode without an unknown piece to be reused."""


def _uncovered(model: Path, texts: list[str]) -> list[str]:
    """The texts that ``model`` encodes with an unknown piece."""
    tokenizer = Tokenizer(model)
    return [text for text in texts if UNK_ID in tokenizer.pieces(text)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    try:
        shards = expand_shards(args.shards, "--shards")
        questions = not args.captions_only
        uncovered: list[str] = []
        if out.exists() and not args.force:
            sample = list(itertools.islice(iter_captions(shards, include_questions=questions), COVERAGE_SAMPLES))
            uncovered = _uncovered(out, sample)
        if out.exists() and not args.force and not uncovered:
            action = "reused existing"
        else:
            if uncovered:
                print(f"the tokenizer {out} does not cover the shards' text (e.g. {uncovered[0]!r} has an unknown "
                      "piece): training it again")
            train_tokenizer(iter_captions(shards, include_questions=questions), out, args.vocab_size,
                            model_type=args.model_type)
            action = f"trained in {time.perf_counter() - start:.1f} s:"
        tokenizer = Tokenizer(out, field_name="--out")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{action} tokenizer {out} (vocab size {tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
