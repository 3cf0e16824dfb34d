"""Run the real `deepspeed` launcher from tests on loopback, and stop everything it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_command(num_ranks: int, script_args: Sequence[str], script: str = "launchers/pretrain.py") -> list[str]:
    """`deepspeed` running ``script`` (relative to the repository) on localhost, loopback master."""
    launcher = Path(sys.executable).parent / "deepspeed"
    return [
        str(launcher),
        "--num_gpus",
        str(num_ranks),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / script),
        *script_args,
    ]


def run(command: Sequence[str], log_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session; on timeout kill the whole process group by PID."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return subprocess.CompletedProcess(command, process.returncode, log_path.read_text(), "")
