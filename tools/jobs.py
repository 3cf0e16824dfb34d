"""Launching a benchmark's job through the real ``deepspeed`` launcher, and stopping all of it.

Shared by the benchmarks that measure a multi-rank job from outside (tools/bench_checkpoint.py,
tools/measure_build_memory.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def remove_shm_leftovers(port: int) -> None:
    """Remove DeepSpeed's shared-memory all-reduce segments of the job on ``port``, should a rank
    have died before megamm unlinked them."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        for path in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"):
            path.unlink(missing_ok=True)


def run_launch(command: list[str], env: dict[str, str], log_path: Path, timeout: float, port: int) -> int:
    """Run ``command`` (a ``deepspeed`` launch on 127.0.0.1:``port``) in a session of its own, its
    output into ``log_path``; stop its process group by PID however it ends. Returns its exit status."""
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"the job ran past --timeout {timeout:.0f} s; stopped it", file=sys.stderr)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # its ranks, if any outlived the launcher
            process.wait()
            remove_shm_leftovers(port)
    return process.returncode
