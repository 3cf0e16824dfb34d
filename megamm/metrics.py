"""TensorBoard logging from one rank; throughput, step-phase timing and memory measurement."""

from __future__ import annotations

import contextlib
import resource
import time
from typing import Callable, Iterator, Optional, Sequence

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


    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, global_step=step)


class Throughput:
    """Samples and steps per second between successive calls of :meth:`rate`."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._samples = 0
        self._steps = 0
        self.elapsed = 0.0
        """Seconds covered by the last :meth:`rate`."""
        self.steps_per_second = 0.0
        """Steps per second over the last :meth:`rate`."""

    def add(self, samples: int) -> None:
        """Count one step of ``samples`` samples."""
        self._samples += samples
        self._steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        self.elapsed, samples, steps = now - self._last, self._samples, self._steps
        self._last, self._samples, self._steps = now, 0, 0
        self.steps_per_second = steps / self.elapsed if self.elapsed > 0 else 0.0
        return samples / self.elapsed if self.elapsed > 0 else 0.0


PHASES = ("data_wait", "forward", "backward", "optimizer")
"""The parts of a training step that :class:`StepTimer` measures by default (a pipeline-parallel
step has ``data_wait`` and ``pipeline``: DeepSpeed interleaves the rest)."""


class StepTimer:
    """Wall time per phase of one step. ``synchronize`` (the accelerator's) is called around each
    phase, and only on steps being measured, so other steps keep the device's asynchrony."""

    def __init__(self, synchronize: Optional[Callable[[], None]] = None, phases: Sequence[str] = PHASES) -> None:
        self._synchronize = synchronize or (lambda: None)
        self.phases = tuple(phases)
        self.enabled = False
        self.seconds: dict[str, float] = dict.fromkeys(self.phases, 0.0)

    def start(self, enabled: bool) -> None:
        """Begin a step; measure it if ``enabled``."""
        self.enabled = enabled
        self.seconds = dict.fromkeys(self.phases, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._synchronize()
        begin = time.perf_counter()
        yield
        self._synchronize()
        self.seconds[name] += time.perf_counter() - begin


def host_max_rss_gb() -> float:
    """This process's peak resident memory in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
