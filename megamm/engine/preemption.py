"""Stopping on a preemption signal: finish the step, agree on it, checkpoint, exit.

Schedulers announce preemption with a signal: SLURM with SIGUSR1 (``--signal=B:USR1@T``) or
SIGTERM, the ``deepspeed`` launcher by forwarding SIGTERM and killing 30 s later. The signal
may reach some ranks and not others, at any point of a step. :class:`StopRequest` records it;
after every step the ranks agree (one small all-reduce) on whether any rank got one, so all of
them stop after the same step, save a checkpoint and raise :class:`Preempted`.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("megamm")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""The signals that ask a run to checkpoint and stop (DataLoader workers ignore them:
``megamm.data.pipeline.WORKER_IGNORED_SIGNALS``)."""


class Preempted(Exception):
    """The run stopped on a preemption signal, after checkpointing the step it had finished."""

    def __init__(self, signum: int, step: int, checkpoint: str) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; the checkpoint {checkpoint} "
            "holds it, and --resume auto continues from there"
        )

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for a process stopped by a signal."""
        return 128 + self.signum


class StopRequest:
    """Records SIGTERM/SIGUSR1 in this process; :meth:`agreed` turns them into one decision for all ranks."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        self._announced = False

    def install(self) -> StopRequest:
        """Catch the stop signals in this process (the main thread must call it)."""
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before :meth:`install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() == self._pid:  # a forked child that kept the handler is not the run
            self.signum = self.signum or signum

    def agreed(self) -> Optional[int]:
        """Collective (every rank calls it at the same point): the stop signal if any rank got one."""
        code = self.signum or 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([code], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code and not self._announced:
            self._announced = True
            heard = "here" if self.signum else "on another rank"
            log.warning("%s received %s: checkpointing this step, then stopping", signal.Signals(code).name, heard)
        return code or None


__all__ = ["STOP_SIGNALS", "Preempted", "StopRequest"]
