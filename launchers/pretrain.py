#!/usr/bin/env python
"""Pre-train a multi-modal model. Run it under any launcher, unchanged:

    deepspeed --num_gpus 4 launchers/pretrain.py --config tiny parallel.tensor_parallel=2
    deepspeed --hostfile hosts launchers/pretrain.py --config tiny --resume auto
    sbatch -N 2 --ntasks-per-node=4 launchers/run.sh --config tiny parallel.tensor_parallel=2
    mpiexec -n 4 python launchers/pretrain.py --config tiny
    torchrun --nproc_per_node 4 launchers/pretrain.py --config tiny

or as one process: python launchers/pretrain.py --config tiny (MASTER_PORT: a free one unless set).
Positional ``key.sub=value`` arguments override the recipe.

Exit status: 0 done, 2 a usage or configuration error (nothing was written), 1 a failure while
training, 128 + N after signal N (SIGTERM or SIGUSR1: preemption) once the step it finished is
checkpointed. When a rank fails, it prints "[rankN] FAILED: <cause>" first; the ranks it leaves
waiting print one line each and stop.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megamm.cli import ds_template, entry_parser, run_entry
from megamm.config import load_config
from megamm.train import run_pretraining


ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = entry_parser(__doc__, ROOT)
    parser.add_argument("--config", default="tiny", help="recipe name (megamm/configs/NAME.yaml) or YAML path")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # options may follow overrides

    def start() -> None:
        config = load_config(args.config, args.overrides)
        run_pretraining(config, ds_template(args.ds_config, ROOT, config), args.resume, args.restart_data)

    return run_entry(start)


if __name__ == "__main__":
    sys.exit(main())
