"""A progress watchdog: a rank that stops making progress ends itself instead of hanging forever.

A dead peer ends a job at once (its connections close). A *hung* one does not: a stopped
process, a stalled filesystem, or a peer stuck elsewhere leaves the others waiting in a
collective. Process-group timeouts do not cover every wait: DeepSpeed's shared-memory CPU
all-reduce spins without one, and a Python thread cannot act while C++ code holds the
interpreter. So two guards run, both re-armed at every sign of progress:

- a thread that prints one clear line and leaves (``os._exit(1)``) after ``timeout_s``;
- ``faulthandler``'s C-level timer, ``grace_s`` later, which needs no interpreter lock: it
  dumps every thread's stack (where the rank hung) to stderr and exits.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Optional


class Watchdog:
    """Ends this process when :meth:`beat` has not been called for ``timeout_s`` seconds.

    Usage: ``watchdog.start()`` once training runs, ``watchdog.beat("step 12")`` at each unit of
    progress (a step, an evaluation batch, before a save), ``watchdog.stop()`` when done.
    """

    def __init__(self, timeout_s: float, rank: int, setting: str = "parallel.collective_timeout_s", grace_s: float = 15.0):
        self.timeout_s = timeout_s
        self.rank = rank
        self.setting = setting
        self.grace_s = grace_s
        self._deadline = float("inf")
        self._doing = ""
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self, doing: str = "starting") -> "Watchdog":
        self._stopped.clear()
        self.beat(doing)
        self._thread = threading.Thread(target=self._watch, name="megamm-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, doing: str) -> None:
        """Progress: ``doing`` names what this rank does next (for the message if it hangs there)."""
        self._doing = doing
        self._deadline = time.monotonic() + self.timeout_s
        faulthandler.dump_traceback_later(self.timeout_s + self.grace_s, exit=True, file=sys.stderr)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() > self._deadline:
                print(
                    f"[rank{self.rank}] FAILED: no progress for {self.timeout_s:.0f} s while {self._doing}: another "
                    f"rank is hung, stopped or far slower, or a collective is stuck ({self.setting} sets the wait); "
                    "stopping this rank",
                    file=sys.stderr,
                    flush=True,
                )
                sys.stdout.flush()
                os._exit(1)


__all__ = ["Watchdog"]
