#!/usr/bin/env python
"""Convert a megamm checkpoint into DeepSpeed's universal format, which resumes on another layout.

    python tools/convert_checkpoint.py runs/a/checkpoints/global_step400 --out runs/b/checkpoints
    deepspeed --num_gpus 8 launchers/pretrain.py --config ... parallel.tensor_parallel=4 \\
        checkpoint.dir=runs/b/checkpoints --resume auto

The source is left as it is. The converted tag holds one file per parameter (fp32 weight and
Adam moments, tensor-parallel shards merged), so the resumed run may use another tensor-parallel
size, pipeline-parallel size (among pipeline layouts) or data-parallel size; the model, the
optimizer settings and the data stream stay those of the source (see README, "Parallel layouts").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamm.engine import MARKER, convert_to_universal, read_marker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a complete checkpoint: <checkpoint.dir>/global_stepN")
    parser.add_argument("--out", type=Path, required=True, help="the new run's checkpoint.dir (created; must not hold that step)")
    args = parser.parse_args(argv)
    try:
        marker = read_marker(args.source)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if marker.get("universal"):
        print(f"error: {args.source} is already a universal checkpoint; resume from it directly", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        target = convert_to_universal(args.source, args.out, MARKER)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {target}: resume with checkpoint.dir={args.out} --resume auto on any layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
