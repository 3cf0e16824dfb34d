"""The run lock on a checkpoint directory, exercised with real processes on the real file system."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

from megamm.engine import runlock
from megamm.engine.runlock import LOCK_NAME, DirectoryLocked, LockLost, LockRecord, RunLock, process_start

HOST = socket.gethostname()
REPO = Path(__file__).resolve().parents[1]
GONE = "node-that-is-gone"

# A child loads runlock.py by path: importing megamm.engine would import DeepSpeed, seconds per child.
# It touches <prefix>.started, waits for the file <go> (unless "-"), tries to acquire (exit 3 when
# refused), touches <prefix>.acquired and holds the lock until its stdin closes.
CHILD = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("megamm_runlock_under_test", sys.argv[1])
runlock = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = runlock
spec.loader.exec_module(runlock)
directory, prefix, go = sys.argv[2:5]
open(prefix + ".started", "w").close()
while go != "-" and not os.path.exists(go):
    time.sleep(0.002)
try:
    lock = runlock.RunLock(directory).acquire()
except runlock.DirectoryLocked:
    sys.exit(3)
open(prefix + ".acquired", "w").close()
sys.stdin.read()
lock.release()
"""

Spawn = Callable[..., subprocess.Popen]


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start lock-taking child processes; every one is killed (by PID) and reaped afterwards."""
    children: list[subprocess.Popen] = []
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))

    def start(directory: Path, name: str, go: Optional[Path] = None) -> subprocess.Popen:
        prefix = str(tmp_path / name)
        command = [sys.executable, "-c", CHILD, runlock.__file__, str(directory), prefix, str(go or "-")]
        child = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        children.append(child)
        return child

    try:
        yield start
    finally:
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait()
            for pipe in (child.stdin, child.stderr):
                if pipe is not None:
                    pipe.close()


def _await_file(child: subprocess.Popen, path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if child.poll() is not None:
            raise AssertionError(f"child exited with {child.returncode}: {child.stderr.read().decode()}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.01)


def _write_record(directory: Path, **changes: object) -> LockRecord:
    """Hand-write a lock record, by default of PID 4242 on another host with a fresh heartbeat."""
    now = time.time()
    record = LockRecord(
        host=GONE,
        pid=4242,
        pid_start="123",
        job_id=None,
        restart_count=0,
        token="f" * 32,
        started=now - 3600,
        heartbeat=now - 1,
        command="python -m megamm.train",
    )
    record = dataclasses.replace(record, **changes)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_NAME).write_text(record.to_json())
    return record


def _holder(directory: Path) -> LockRecord:
    return LockRecord.from_json((directory / LOCK_NAME).read_bytes())


def _refused(directory: Path) -> str:
    """Acquire on ``directory`` must be refused without touching the lock file; the message."""
    before = (directory / LOCK_NAME).read_bytes()
    with pytest.raises(DirectoryLocked) as caught:
        RunLock(directory).acquire()
    assert (directory / LOCK_NAME).read_bytes() == before
    assert sorted(os.listdir(directory)) == [LOCK_NAME]
    return str(caught.value)


def _taken_over(directory: Path, caplog: pytest.LogCaptureFixture) -> str:
    """Acquire on ``directory`` must take the lock over; the warning it logged."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megamm"), RunLock(directory) as lock:
        assert _holder(directory) == lock.record
        assert sorted(os.listdir(directory)) == [LOCK_NAME]
    assert not (directory / LOCK_NAME).exists()
    return caplog.text


def test_record_round_trips_and_rejects_incomplete_json() -> None:
    record = LockRecord.for_this_process()
    assert LockRecord.from_json(record.to_json()) == record
    assert (record.host, record.pid, record.job_id, record.restart_count) == (HOST, os.getpid(), None, 0)
    for bad in (b"", b"[]", b'{"host": "n1"}', record.to_json().replace('"pid": ', '"pid": "x').encode()):
        with pytest.raises(ValueError):
            LockRecord.from_json(bad)


def test_acquire_writes_our_record_and_release_removes_it(tmp_path: Path) -> None:
    lock = RunLock(tmp_path).acquire()
    try:
        record = _holder(tmp_path)
        assert record == lock.record
        assert (record.host, record.pid, record.pid_start) == (HOST, os.getpid(), process_start(os.getpid()))
        assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]
        lock.check()
    finally:
        lock.release()
    assert os.listdir(tmp_path) == []
    lock.release()
    assert lock.record is None
    with RunLock(tmp_path) as again:
        assert again.record is not None and again.record.token != record.token


def test_release_removes_only_the_directories_acquire_created(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "exp1"
    with RunLock(target) as lock:
        assert lock.path == target / LOCK_NAME and lock.path.is_file()
    assert os.listdir(tmp_path) == []
    with RunLock(target):
        (target / "global_step10").mkdir()
    assert os.listdir(target) == ["global_step10"]


def test_live_holder_is_refused(tmp_path: Path, spawn: Spawn) -> None:
    directory = tmp_path / "ckpt"
    child = spawn(directory, "holder")
    _await_file(child, tmp_path / "holder.acquired")
    message = _refused(directory)
    for part in (f"PID {child.pid}", HOST, str(directory), "checkpoint.dir", str(directory / LOCK_NAME)):
        assert part in message
    child.stdin.close()
    assert child.wait(timeout=20) == 0
    assert not directory.exists(), "the holder created the directory, so its release removes it"


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_holder_killed_with_sigkill_is_taken_over_at_once(
    tmp_path: Path, spawn: Spawn, caplog: pytest.LogCaptureFixture, reaped: bool
) -> None:
    directory = tmp_path / "ckpt"
    child = spawn(directory, "holder")
    _await_file(child, tmp_path / "holder.acquired")
    os.kill(child.pid, signal.SIGKILL)
    if reaped:
        child.wait(timeout=20)
    else:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert f"PID {child.pid} on host {HOST}" in _taken_over(directory, caplog)


def test_reused_pid_is_dead(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    parent = os.getppid()
    start = process_start(parent)
    assert start is not None, "process start times come from /proc, which Linux always has"
    _write_record(tmp_path, host=HOST, pid=parent, pid_start=start)
    assert f"PID {parent}" in _refused(tmp_path)
    _write_record(tmp_path, host=HOST, pid=parent, pid_start=str(int(start) + 1))
    assert "now belongs to another process" in _taken_over(tmp_path, caplog)


def test_own_leftover_record_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_record(tmp_path, host=HOST, pid=os.getpid(), pid_start=process_start(os.getpid()))
    assert "left by this same process" in _taken_over(tmp_path, caplog)


def test_remote_holder_with_stale_heartbeat_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_record(tmp_path, heartbeat=time.time() - 600, job_id="55")
    warning = _taken_over(tmp_path, caplog)
    assert f"PID 4242 on host {GONE} (SLURM job 55)" in warning
    assert "heartbeat is 600 s old" in warning or "heartbeat is 601 s old" in warning


def test_remote_holder_with_fresh_heartbeat_is_refused(tmp_path: Path) -> None:
    _write_record(tmp_path, job_id="55")
    message = _refused(tmp_path)
    for part in (f"PID 4242 on host {GONE} (SLURM job 55)", "last heartbeat 1 s ago", "older than 120 s"):
        assert part in message


@pytest.mark.parametrize("restart_count, taken", [("1", True), ("0", False)])
def test_requeued_slurm_job_takes_over_its_previous_incarnation(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    restart_count: str,
    taken: bool,
) -> None:
    _write_record(tmp_path, job_id="77", restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart_count)
    if taken:
        assert "it was incarnation 0 of requeued job 77" in _taken_over(tmp_path, caplog)
    else:
        assert "SLURM job 77" in _refused(tmp_path)


def test_heartbeat_advances(tmp_path: Path) -> None:
    with RunLock(tmp_path, heartbeat_interval=0.2) as lock:
        first = _holder(tmp_path)
        deadline = time.monotonic() + 5
        while _holder(tmp_path).heartbeat == first.heartbeat:
            assert time.monotonic() < deadline, "the heartbeat did not advance"
            time.sleep(0.05)
        beaten = _holder(tmp_path)
        assert beaten.heartbeat > first.heartbeat
        assert dataclasses.replace(beaten, heartbeat=first.heartbeat) == first
        lock.check()


def test_check_raises_when_another_run_takes_over(tmp_path: Path) -> None:
    path = tmp_path / LOCK_NAME
    with RunLock(tmp_path, heartbeat_interval=0.2) as lock:
        ours = path.read_bytes()
        foreign = _write_record(tmp_path, host="other-node", token="e" * 32).to_json().encode()
        with pytest.raises(LockLost, match="taken over by PID 4242 on host other-node"):
            lock.check()
        time.sleep(0.7)
        assert path.read_bytes() == foreign, "the heartbeat overwrote the new holder's record"
        path.write_bytes(ours)
        with pytest.raises(LockLost, match="other-node"):
            lock.check()
        path.write_bytes(foreign)
    assert path.read_bytes() == foreign, "release removed the new holder's lock"


def test_check_raises_when_the_lock_file_vanishes(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        lock.path.unlink()
        with pytest.raises(LockLost, match="disappeared"):
            lock.check()


@pytest.mark.parametrize("age, taken", [(0, False), (600, True)], ids=["fresh", "old"])
def test_unreadable_lock_file_is_judged_by_its_age(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, age: float, taken: bool
) -> None:
    path = tmp_path / LOCK_NAME
    path.write_bytes(b"\x00\xff{garbage")
    then = time.time() - age
    os.utime(path, (then, then))
    if taken:
        assert "unreadable" in _taken_over(tmp_path, caplog)
    else:
        message = _refused(tmp_path)
        assert "unreadable" in message and str(path) in message


def test_takeover_leaves_a_lock_that_changed_since_it_was_judged(tmp_path: Path) -> None:
    _write_record(tmp_path, heartbeat=time.time() - 600)
    lock = RunLock(tmp_path)
    judged = lock._read()
    assert judged is not None
    fresh = _write_record(tmp_path, token="e" * 32).to_json().encode()
    assert not lock._bury(judged)
    assert (tmp_path / LOCK_NAME).read_bytes() == fresh
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME]


def test_only_one_of_concurrent_starters_wins(tmp_path: Path, spawn: Spawn) -> None:
    directory = tmp_path / "ckpt"
    _write_record(directory, heartbeat=time.time() - 600)
    go = tmp_path / "go"
    children = [spawn(directory, f"starter{i}", go) for i in range(4)]
    for i, child in enumerate(children):
        _await_file(child, tmp_path / f"starter{i}.started")
    go.touch()
    deadline = time.monotonic() + 20
    while sum(child.poll() is not None for child in children) < 3:
        assert time.monotonic() < deadline, "the starters did not finish"
        time.sleep(0.02)
    time.sleep(0.2)
    codes = [child.poll() for child in children]
    errors = [child.stderr.read().decode() for child in children if child.returncode not in (None, 3)]
    assert sorted(codes, key=str) == [3, 3, 3, None], errors
    winner = children[codes.index(None)]
    assert _holder(directory).pid == winner.pid
    winner.stdin.close()
    assert winner.wait(timeout=20) == 0
    assert os.listdir(directory) == []
