#!/usr/bin/env python
"""Pre-train a multi-modal model. Run under a launcher, e.g.

    deepspeed --num_gpus 4 launchers/pretrain.py --config tiny parallel.tensor_parallel=2
    deepspeed --hostfile hosts launchers/pretrain.py --config tiny --resume auto

or as one process: python launchers/pretrain.py --config tiny (MASTER_PORT: a free one unless set).
Positional ``key.sub=value`` arguments override the recipe.

Exit status: 0 done, 2 a usage or configuration error (nothing was written), 1 a failure while
training, 128 + N after signal N (SIGTERM or SIGUSR1: preemption) once the step it finished is
checkpointed. When a rank fails, it prints "[rankN] FAILED: <cause>" first; the ranks it leaves
waiting print one line each and stop.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from megamm.config import ConfigError, load_config
from megamm.engine import Preempted, is_peer_failure, launch_info
from megamm.train import run_pretraining


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="recipe name (megamm/configs/NAME.yaml) or YAML path")
    parser.add_argument("--ds-config", default="ds_configs/zero3.json", help="DeepSpeed JSON template")
    parser.add_argument(
        "--resume", default="auto", help="auto (newest complete checkpoint, if any), none, or a checkpoint path"
    )
    parser.add_argument(
        "--restart-data",
        action="store_true",
        help="on resume, read the training data from its beginning (needed after changing the shards, "
        "data.num_workers, data.seed or data.shuffle_buffer); the model and optimizer still resume",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher; unused")
    parser.add_argument("overrides", nargs="*", help="config overrides: key.sub=value")
    return parser.parse_intermixed_args(argv)  # options may come after overrides


def _cause(error: BaseException) -> str:
    """One line naming the error; a DataLoader worker's error is unwrapped to the original."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.splitlines()[-1]  # "<Type>: <message>" as raised inside the worker
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _stop(code: int) -> None:
    """Leave at once: a rank whose peers are gone can hang in process-group teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    info = launch_info()
    prefix = f"[rank{info.rank}] " if info.world_size > 1 else ""
    try:
        config = load_config(args.config, args.overrides)
        run_pretraining(config, args.ds_config, args.resume, args.restart_data)
    except ConfigError as error:
        print(f"{prefix}configuration error: {error}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:
        if info.rank == 0:
            print(f"preempted: {stop}", file=sys.stderr, flush=True)
        if info.world_size > 1:
            _stop(stop.exit_code)
        return stop.exit_code
    except Exception as error:  # a failure while training: make this rank's cause stand out
        if info.world_size > 1 and is_peer_failure(error):
            print(
                f"{prefix}stopped: another rank failed ({_cause(error)[:160]}); its cause is the line "
                "'[rankN] FAILED: ...'",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"{prefix or '[rank0] '}FAILED: {_cause(error)}", file=sys.stderr, flush=True)
            traceback.print_exc()
        if info.world_size > 1:
            _stop(1)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
