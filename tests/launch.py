"""Run the real entry points from tests (`deepspeed` on loopback, or one plain process), and stop
everything they started; compare directory trees before and after."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Optional, Sequence

from megamm.engine import free_port

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = str(ROOT / "launchers/pretrain.py")


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
    """Run ``command`` in its own session; on timeout stop the whole process group by PID: SIGTERM
    (a tool that started sessions of its own stops them), then SIGKILL after 15 s."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return subprocess.CompletedProcess(command, process.returncode, log_path.read_text(), "")


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file and a marker for every directory under ``roots`` (absent roots included)."""
    state: dict[str, str] = {}
    for root in roots:
        if not root.exists():
            state[str(root)] = "absent"
            continue
        for path in sorted(root.rglob("*")):
            state[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def pretrain(
    args: list[str], env: Optional[dict[str, str]] = None, timeout: float = 180, script: str = PRETRAIN
) -> subprocess.CompletedProcess:
    """``python launchers/pretrain.py ARGS`` (or another entry ``script``) as a user runs it: one
    process, no launcher."""
    base = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_FINISHED: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}


def finished_single_process_run(data: dict[str, str], tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python launchers/pretrain.py --config clip_tiny`` on the test run's overrides (4 steps,
    checkpoints at steps 2 and 4): its run directory and its completed process. Trained once per
    test session, by whichever test asks first (tests/test_e2e_deepspeed.py, tests/test_misuse.py).
    The port the skeleton always used (29555) is held taken while it starts: it must pick a free one."""
    key = data["data.train_shards"]
    if key not in _FINISHED:
        run_dir = tmp_path_factory.mktemp("run")
        with socket.socket() as taken:
            try:
                taken.bind(("127.0.0.1", 29555))
                taken.listen()
            except OSError:
                pass  # taken already: the run must still start
            result = pretrain(["--config", "clip_tiny", *overrides(data, run_dir)])
        assert result.returncode == 0, result.stderr[-3000:]
        _FINISHED[key] = run_dir, result
    return _FINISHED[key]


def overrides(data: dict[str, str], run_dir: Path, **changes: str) -> list[str]:
    """The test run's overrides, ``changes`` replacing (never repeating) a key; value None drops it."""
    values = {
        **data,
        "micro_batch_size": "8",
        "train_steps": "4",
        "optim.warmup_steps": "1",
        "checkpoint.save_interval": "2",
        "checkpoint.dir": str(run_dir / "checkpoints"),
        "logging.tensorboard_dir": str(run_dir / "tensorboard"),
        **{key.replace("__", "."): value for key, value in changes.items()},
    }
    return [f"{key}={value}" for key, value in values.items() if value is not None]


def write_bad_shard(path: Path, count: int) -> None:
    """A tar shard of ``count`` samples that have neither caption nor image (each one skipped)."""
    with tarfile.open(path, "w") as tar:
        for index in range(count):
            payload = b'{"note": "no caption, no image"}'
            info = tarfile.TarInfo(f"bad-{path.stem}-{index:04d}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def tensorboard_events(tensorboard: str | Path, tag: str) -> dict[int, list[float]]:
    """Every ``tag`` value TensorBoard shows, by step (a step logged twice shows twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tensorboard))
    accumulator.Reload()
    events: dict[int, list[float]] = {}
    for event in accumulator.Scalars(tag):
        events.setdefault(event.step, []).append(event.value)
    return events


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL whatever is left of ``process``'s process group (it was started in a session of its own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
