"""Run a function on N CPU processes joined by a gloo group (file:// rendezvous, no ports)."""

from __future__ import annotations

import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, init_file: str, args: tuple) -> None:
    """One child: join the group, run ``fn``, leave.

    A child that succeeded leaves through ``os._exit(0)``: interpreter teardown after a DeepSpeed
    engine can abort in a C++ destructor ("terminate called without an active exception"), which
    would report a passing rank as killed by SIGABRT. A failure still raises, so ``mp.spawn``
    carries its traceback to the parent.
    """
    faulthandler.enable()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any, timeout: Optional[float] = None
) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` processes; re-raise any failure.

    ``fn`` must be a module-level function (it is pickled into the children). ``timeout``: seconds
    after which the children are killed and the call fails (a hang); None waits for ever.
    """
    init_file = str(tmp_path / f"rendezvous-{os.getpid()}-{world_size}")
    context = mp.spawn(_entry, args=(fn, world_size, init_file, args), nprocs=world_size, join=False)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if deadline is not None and time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join()
            raise TimeoutError(f"{world_size} ranks did not finish within {timeout:.0f} s: a hang (ranks killed)")
