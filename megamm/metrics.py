"""TensorBoard logging from one rank, and throughput measurement."""

from __future__ import annotations

import time
from typing import Optional

from torch.utils.tensorboard import SummaryWriter


class MetricsWriter:
    """Writes scalars to TensorBoard when ``active`` (the logging rank); a no-op elsewhere."""

    def __init__(self, log_dir: str, active: bool, purge_step: Optional[int] = None) -> None:
        """``purge_step``: the first step a resumed run logs. TensorBoard then hides what an
        earlier attempt logged from that step on (after a crash, steps past its last checkpoint),
        so the curves stay continuous, each step once."""
        self.log_dir = log_dir
        self._writer: Optional[SummaryWriter] = SummaryWriter(log_dir, purge_step=purge_step) if active else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Throughput:
    """Samples per second between successive calls of :meth:`rate`."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._samples = 0

    def add(self, samples: int) -> None:
        self._samples += samples

    def rate(self) -> float:
        now = time.perf_counter()
        elapsed, samples = now - self._last, self._samples
        self._last, self._samples = now, 0
        return samples / elapsed if elapsed > 0 else 0.0
