#!/usr/bin/env python
"""Convert a megamm checkpoint into DeepSpeed's universal format, which resumes on another layout.

    python tools/convert_checkpoint.py runs/a/checkpoints/global_step400 --out runs/b/checkpoints
    deepspeed --num_gpus 8 launchers/pretrain.py --config ... parallel.tensor_parallel=4 \\
        checkpoint.dir=runs/b/checkpoints --resume auto

The source is left as it is. The converted tag holds one file per parameter (fp32 weight and
Adam moments, tensor-parallel shards merged), so the resumed run may use another tensor-parallel,
pipeline-parallel or data-parallel size; the model, the optimizer settings (parallel.zero_stage
included) and the data stream stay those of the source (see README, "Parallel layouts").

Without pipeline stages (parallel.pipeline_parallel=1) the model is trained in its plain form,
with 2 or more in its pipeline form, and the two name their parameters differently. The
converted tag is named for the source's form unless --to says otherwise:

    --to plain      resume a checkpoint trained with pipeline stages at pipeline_parallel=1
    --to pipeline   resume a checkpoint trained without stages at pipeline_parallel >= 2
                    (a ZeRO-1 run: pipeline stages run no higher ZeRO stage)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamm.engine import MARKER, convert_to_universal, read_marker
from megamm.engine.forms import FORMS, form_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a complete checkpoint: <checkpoint.dir>/global_stepN")
    parser.add_argument("--out", type=Path, required=True, help="the new run's checkpoint.dir (created; must not hold that step)")
    parser.add_argument(
        "--to",
        choices=FORMS,
        default=None,
        help="the form of the resumed run: plain (pipeline_parallel=1) or pipeline (2 or more stages); default: the source's",
    )
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
        target = convert_to_universal(args.source, args.out, MARKER, args.to)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    form = args.to or form_for(marker.get("pipeline_parallel", 1))
    stages = "parallel.pipeline_parallel=1" if form == "plain" else "2 or more pipeline stages"
    print(f"wrote {target}: resume with checkpoint.dir={args.out} --resume auto, on any layout with {stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
