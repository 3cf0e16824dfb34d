#!/usr/bin/env python
"""Fine-tune from a megamm checkpoint on your own data. Run it under any launcher, unchanged:

    deepspeed --num_gpus 4 launchers/finetune.py --from runs/pretrain/checkpoints \
        --data_path '/data/mine/train-{000000..000063}.tar' --eval_path '/data/mine/val-000000.tar' \
        optim.lr=1e-4 train_steps=2000 checkpoint.dir=runs/ft/checkpoints logging.tensorboard_dir=runs/ft/tb
    MEGAMM_ENTRY=launchers/finetune.py sbatch launchers/run.sh --from ... checkpoint.dir=...

It takes the weights only: the optimizer, LR schedule, step counter and data stream start
afresh. The config starts as the checkpoint's own (the model and tokenizer stay), and the
overrides change the rest: learning rate, steps, warmup, batch size, data. The run evaluates
the starting weights at step 0, then on the held-out shards as configured. It writes its own
checkpoint.dir and logging.tensorboard_dir (the source run's are refused); with --resume auto
(the default), a preempted fine-tuning run continues from its own checkpoints.
--from takes a checkpoint.dir (its newest complete checkpoint) or one global_step<N> directory;
the run keeps the checkpoint's parallel.tensor_parallel, and any data-parallel size works.

Exit status: 0 done, 2 a usage or configuration error (nothing was written), 1 a failure while
training, 128 + N after signal N (SIGTERM or SIGUSR1: preemption) once the step it finished is
checkpointed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megamm.cli import ds_template, entry_parser, run_entry
from megamm.config import ConfigError, config_from_dict
from megamm.engine import read_marker
from megamm.preflight import resolve_init_source
from megamm.train import run_pretraining


ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = entry_parser(__doc__, ROOT)
    parser.add_argument(
        "--from", dest="source", required=True, help="checkpoint to start from: a checkpoint.dir or a global_step<N>"
    )
    parser.add_argument("--data_path", help="training shards (the same as data.train_shards=SPEC)")
    parser.add_argument("--eval_path", help="held-out shards (the same as data.eval_shards=SPEC)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # options may follow overrides

    def start() -> None:
        source = resolve_init_source(args.source)
        overrides = list(args.overrides)
        for option, value, key in (("--data_path", args.data_path, "data.train_shards"), ("--eval_path", args.eval_path, "data.eval_shards")):
            if value is None:
                continue
            if any(item.split("=", 1)[0].strip() == key for item in overrides):
                raise ConfigError(f"{option} and {key}= both name the shards; give one of them")
            overrides.append(f"{key}={value}")
        config = config_from_dict(read_marker(source)["config"], overrides)
        run_pretraining(config, ds_template(args.ds_config, ROOT, config), args.resume, args.restart_data, init_from=source)

    return run_entry(start)


if __name__ == "__main__":
    sys.exit(main())
