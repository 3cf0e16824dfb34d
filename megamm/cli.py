"""What the entry points in ``launchers/`` share: their common options and one error path.

Exit status of every entry point: 0 done, 2 a usage or configuration error (nothing was
written), 1 a failure while training, 128 + N after signal N (SIGTERM or SIGUSR1: preemption)
once the step it finished is checkpointed. When a rank fails, it prints "[rankN] FAILED:
<cause>" first; the ranks it leaves waiting print one line each and stop.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from megamm.config import ConfigError, TrainConfig
from megamm.engine import CheckpointSaveError, Preempted, is_collective_timeout, is_peer_failure, launch_info


def entry_parser(description: str, root: Path) -> argparse.ArgumentParser:
    """The options every entry point takes; positional ``key.sub=value`` overrides the recipe.

    ``root``: the repository the entry point lives in; the default DeepSpeed template is its
    ``ds_configs/zero<parallel.zero_stage>.json`` (:func:`ds_template`), wherever the job is
    launched from.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ds-config",
        default=None,
        help=f"DeepSpeed JSON template (default: {root / 'ds_configs'}/zero<parallel.zero_stage>.json)",
    )
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
    return parser


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


def ds_template(given: Optional[str], root: Path, config: TrainConfig) -> str:
    """``--ds-config`` if given, else the repository's template for ``parallel.zero_stage``."""
    return given if given is not None else str(root / "ds_configs" / f"zero{config.parallel.zero_stage}.json")


def run_entry(start: Callable[[], Any]) -> int:
    """Run ``start`` (which loads the config and trains) with the entry points' error handling.

    Returns the exit status (see the module docstring); a rank of a multi-rank job whose run
    failed or was preempted leaves through ``os._exit`` instead of returning.
    """
    info = launch_info()
    prefix = f"[rank{info.rank}] " if info.world_size > 1 else ""
    try:
        start()
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
        elif isinstance(error, CheckpointSaveError):  # every rank raises it; it says all there is to say
            if info.rank == 0:
                print(f"{prefix}FAILED: {error}", file=sys.stderr, flush=True)
        elif info.world_size > 1 and is_collective_timeout(error):
            print(
                f"{prefix}FAILED: a collective timed out waiting for another rank, which is hung, stopped or "
                f"far slower (parallel.collective_timeout_s sets the wait): {_cause(error)[:300]}",
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


__all__ = ["entry_parser", "run_entry"]
