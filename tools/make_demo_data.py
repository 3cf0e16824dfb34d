"""Write the synthetic demo dataset (coloured shapes with captions) as WebDataset shards.

    python tools/make_demo_data.py --out demo_data

Reuses an existing dataset written with the same parameters. Replaces only shards that it wrote
itself (listed in its manifest.json); other shards in the way are refused unless --force.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from megamm.data import write_demo_dataset
from megamm.data.demo import DEFAULT_AUDIO_FRACTION


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_data", help="output directory (default: demo_data)")
    parser.add_argument("--train-shards", type=int, default=8, help="number of training shards")
    parser.add_argument("--samples-per-shard", type=int, default=1024, help="samples per training shard")
    parser.add_argument("--eval-samples", type=int, default=160,
                        help="eval samples, at most 160 (each attribute combination once)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--audio-fraction", type=float, default=DEFAULT_AUDIO_FRACTION,
                        help="fraction of training samples with a sound, each drawn independently (every "
                             f"evaluation sample has one; default {DEFAULT_AUDIO_FRACTION}); 0: no audio in training")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the output is a function of the arguments")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel writer processes (default: one per CPU)")
    parser.add_argument("--force", action="store_true",
                        help="replace shard-NNNNNN.tar files in the output that this tool did not write")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    try:
        manifest = write_demo_dataset(
            args.out,
            train_shards=args.train_shards,
            samples_per_shard=args.samples_per_shard,
            eval_samples=args.eval_samples,
            image_size=args.image_size,
            audio_fraction=args.audio_fraction,
            seed=args.seed,
            workers=args.workers,
            force=args.force,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    action = "reused existing" if manifest["reused"] else f"wrote in {elapsed:.1f} s:"
    train, evaluation = manifest["train"], manifest["eval"]
    print(f"{action} demo dataset in {args.out}")
    for name, split in (("train", train), ("eval", evaluation)):
        where = f"{args.out}/{split['pattern']}"
        print(f"  {name + ':':6} {split['samples']} samples in {len(split['shards'])} shard(s)  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
