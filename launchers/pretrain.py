#!/usr/bin/env python
"""Pre-train a multi-modal model. Run under a launcher, e.g.

    deepspeed --num_gpus 4 launchers/pretrain.py --config tiny parallel.tensor_parallel=2
    deepspeed --hostfile hosts launchers/pretrain.py --config tiny --resume auto

Positional ``key.sub=value`` arguments override the recipe.
"""

from __future__ import annotations

import argparse
import sys

from megamm.config import ConfigError, load_config
from megamm.train import run_pretraining


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="recipe name (megamm/configs/NAME.yaml) or YAML path")
    parser.add_argument("--ds-config", default="ds_configs/zero3.json", help="DeepSpeed JSON template")
    parser.add_argument(
        "--resume", default="auto", help="auto (newest complete checkpoint, if any), none, or a checkpoint path"
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; unused")
    parser.add_argument("overrides", nargs="*", help="config overrides: key.sub=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args.config, args.overrides)
        run_pretraining(config, args.ds_config, args.resume)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
