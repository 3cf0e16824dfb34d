"""Train the SentencePiece tokenizer on the captions (and the questions and answers) of a set of shards.

    python tools/train_tokenizer.py --shards 'demo_data/train/shard-{000000..000007}.tar' \
        --out demo_data/tokenizer.model --vocab-size 256
    python tools/train_tokenizer.py --shards /data/cc3m/train-{0000..0575}.tar \
        'pipe:aws s3 cp s3://bucket/audiocaps/train-{000..099}.tar -' --max-texts 2000000 \
        --out runs/tok/tokenizer.model --vocab-size 32000

Captions are streamed from the shards as training reads them (``txt``, ``json`` captions; several
specifications, ``pipe:`` commands included), with a progress bar; ``--max-texts`` stops early
(SentencePiece samples at most 2,000,000 sentences anyway).

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

from tqdm import tqdm

from megamm.config import DataConfig, TextConfig
from megamm.data import UNK_ID, Tokenizer, expand_shards, iter_captions, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    data_defaults, text_defaults = DataConfig(), TextConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", nargs="+", default=[data_defaults.train_shards],
                        help="shard specifications: brace patterns, globs, directories, pipe: commands, comma lists")
    parser.add_argument("--max-texts", type=int, default=0,
                        help="stop after this many captions, questions and answers (0: read every shard)")
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
        if args.max_texts < 0:
            raise ValueError(f"--max-texts={args.max_texts} must be >= 0 (0: every text)")
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
            texts = tqdm(iter_captions(shards, include_questions=questions), desc="texts", unit=" texts",
                         total=args.max_texts or None, file=sys.stderr, disable=None)
            limited = itertools.islice(texts, args.max_texts) if args.max_texts else texts
            train_tokenizer(limited, out, args.vocab_size, model_type=args.model_type)
            texts.close()
            action = f"trained in {time.perf_counter() - start:.1f} s:"
        tokenizer = Tokenizer(out, field_name="--out")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{action} tokenizer {out} (vocab size {tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
