"""A run lock on a checkpoint directory, so that one training run at a time writes into it.

Two runs pointed at the same ``checkpoint.dir`` would silently overwrite each other's
checkpoints. A run therefore takes a :class:`RunLock` on the directory before it starts. The
lock must work on a file system shared by several nodes (NFS, Lustre), where ``flock`` and
``fcntl`` locks are unreliable, so it is an owner record plus a heartbeat, changed only by
operations that are atomic there: ``link``, ``rename`` and ``replace``.

The lock is the file ``<directory>/megamm.lock``, a small JSON :class:`LockRecord` naming the
holder (host, PID and the PID's start time, SLURM job id and restart count), a token unique to
the acquisition and the time of the holder's last heartbeat.

Acquire
    1. Write our record to a unique temp file in the directory, fsync it and ``link`` it to
       ``megamm.lock``. If the link succeeds we hold the lock. (A link that reports EEXIST
       although the temp file's link count rose to 2 succeeded too: NFS may retransmit it.)
    2. Otherwise read the existing record and judge whether its holder is alive (below).
       Alive: raise :class:`DirectoryLocked`.
    3. Dead: if the lock still holds exactly the bytes we judged, rename it to a unique grave
       name. If the grave holds those bytes, delete it and go back to 1. If it holds something
       else, another starter took the lock over in between and we moved its fresh lock: link it
       back and go back to 1, where it is judged alive. (With three or more starters taking
       over the same dead lock at once, a third one's link can, rarely, land while the first
       one's fresh lock is moved aside; the first run's heartbeat then reports the loss, which
       :meth:`RunLock.check` raises, within ``heartbeat_interval``.)

Liveness of a holder, by the first rule that applies
    1. Same host as us: alive iff its PID runs (a zombie does not count) and, where ``/proc``
       gives process start times, still belongs to the process that wrote the record. A
       holder killed with ``kill -9`` on this host is therefore dead at once. A record written
       by this very process is ours to replace.
    2. Same SLURM job id as ours and a lower restart count: an earlier incarnation of this
       requeued job, dead.
    3. Otherwise: alive iff its heartbeat is younger than ``stale_after`` seconds. An
       unreadable record counts as a holder on an unknown host whose heartbeat is the file's
       modification time, so a half-written foreign file neither blocks forever nor is taken
       over at once.

Hold
    A daemon thread rewrites the record with a new heartbeat every ``heartbeat_interval``
    seconds (temp file, fsync, ``replace``) as long as the file holds our token. If it holds
    another token or is gone, the thread records the loss and stops; :meth:`RunLock.check`
    then raises :class:`LockLost`, so the run can stop before writing into a directory that is
    no longer its own.

Release
    Rename the lock to a grave and delete it if it holds our token (otherwise link it back),
    and remove the directory if acquire created it and it is empty again.

The nodes' clocks are assumed to agree to well within ``stale_after``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

from megamm.config import ConfigError

LOCK_NAME = "megamm.lock"
"""File name of the lock inside the locked directory."""

MAX_TRIES = 10
"""Attempts of the acquire loop before giving up on a directory whose lock keeps changing."""

MISSING_GRACE = 0.2
"""Seconds the heartbeat waits and looks again before it takes a missing lock file as lost."""

log = logging.getLogger("megamm")


@dataclass(frozen=True)
class LockRecord:
    """Who holds a run lock, as stored (JSON) in the lock file."""

    host: str
    pid: int
    pid_start: Optional[str]
    """Start time of ``pid`` (field 22 of /proc/<pid>/stat), or None without /proc.

    Guards against PID reuse."""
    job_id: Optional[str]
    """SLURM_JOB_ID of the holder, if it ran under SLURM."""
    restart_count: int
    """SLURM_RESTART_COUNT of the holder: how often its job had been requeued."""
    token: str
    """Unique per acquisition."""
    started: float
    heartbeat: float
    """time.time() of the holder's last heartbeat."""
    command: str

    @classmethod
    def for_this_process(cls) -> LockRecord:
        """A record naming the current process, with a new token."""
        now = time.time()
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_start=process_start(os.getpid()),
            job_id=os.environ.get("SLURM_JOB_ID") or None,
            restart_count=_restart_count(),
            token=uuid.uuid4().hex,
            started=now,
            heartbeat=now,
            command=" ".join(sys.argv)[:200],
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> LockRecord:
        """Parse a lock file's content; ValueError if it is not a complete lock record."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a lock record is a JSON object")
        return cls(
            host=_typed(data, "host", str),
            pid=_typed(data, "pid", int),
            pid_start=_typed(data, "pid_start", (str, type(None))),
            job_id=_typed(data, "job_id", (str, type(None))),
            restart_count=_typed(data, "restart_count", int),
            token=_typed(data, "token", str),
            started=float(_typed(data, "started", (int, float))),
            heartbeat=float(_typed(data, "heartbeat", (int, float))),
            command=_typed(data, "command", str),
        )

    def describe(self) -> str:
        """``PID 1234 on host n1 (SLURM job 77)``."""
        job = f" (SLURM job {self.job_id})" if self.job_id else ""
        return f"PID {self.pid} on host {self.host}{job}"


class DirectoryLocked(ConfigError):
    """A live run holds the run lock of the checkpoint directory."""


class LockLost(RuntimeError):
    """Another run has taken over the run lock this run held."""


@dataclass(frozen=True)
class _Held:
    """A lock file as read: its raw bytes, its record (None if unreadable) and mtime."""

    raw: bytes
    record: Optional[LockRecord]
    mtime: float


class RunLock:
    """Exclusive right of one training run to write into ``directory``; see the module docstring.

    Use as ``with RunLock(config.checkpoint.dir): ...`` or call :meth:`acquire` and
    :meth:`release`; call :meth:`check` before each checkpoint save.
    """

    def __init__(
        self, directory: str | Path, *, heartbeat_interval: float = 10.0, stale_after: float = 120.0
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        if stale_after <= heartbeat_interval:
            raise ValueError(
                f"stale_after={stale_after} must exceed heartbeat_interval={heartbeat_interval}, "
                "or a live holder would look dead between two heartbeats"
            )
        self.directory = Path(directory)
        self.heartbeat_interval = heartbeat_interval
        self.stale_after = stale_after
        self._record: Optional[LockRecord] = None
        self._created: list[Path] = []
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lost: Optional[str] = None
        self._beat_error: Optional[BaseException] = None
        self._last_beat = 0.0

    @property
    def path(self) -> Path:
        """The lock file, ``<directory>/megamm.lock``."""
        return self.directory / LOCK_NAME

    @property
    def record(self) -> Optional[LockRecord]:
        """Our record while the lock is held (its heartbeat as last written), else None."""
        return self._record

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock; raises DirectoryLocked while a live run holds it. Returns self."""
        if self._record is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self._created = _make_directory(self.directory)
        mine = LockRecord.for_this_process()
        tmp = self._temp_path()
        try:
            _write_synced(tmp, mine.to_json().encode("utf-8"))
            self._acquire_loop(tmp, mine)
        except BaseException:
            _remove_empty(self._created)
            self._created = []
            raise
        finally:
            tmp.unlink(missing_ok=True)
        self._start_heartbeat(mine)
        return self

    def release(self) -> None:
        """Give the lock up; idempotent.

        Stops the heartbeat, removes the lock file if it still holds our token, and removes the
        directory again if acquire created it and it is now empty.
        """
        record = self._record
        if record is None:
            return
        self._stop.set()
        with self._mutex:
            self._record = None
            if self._lost is None:
                self._remove_if_ours(record.token)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        _remove_empty(self._created)
        self._created = []

    def check(self) -> None:
        """Raise LockLost if this run no longer holds the lock.

        That is: the heartbeat saw another token or no lock file, the lock file holds another
        token now, the heartbeat thread failed, or it could not write for ``stale_after`` seconds,
        so that another run may have taken the lock over.
        """
        record = self._record
        if record is None:
            raise RuntimeError(f"{self.path} is not held by this RunLock")
        if self._lost is not None:
            raise LockLost(self._lost)
        error = self._beat_error
        if error is not None and not isinstance(error, OSError):
            raise LockLost(f"the heartbeat of {self.path} failed: {error!r}") from error
        silent = time.time() - self._last_beat
        if error is not None and silent >= self.stale_after:
            raise LockLost(
                f"could not refresh the heartbeat of {self.path} for {silent:.0f} s (last error: {error}); "
                "another run may have taken checkpoint.dir over"
            ) from error
        lost = self._loss(self._read(), record.token)
        if lost is not None:
            raise LockLost(lost)

    def _acquire_loop(self, tmp: Path, mine: LockRecord) -> None:
        taken_over: Optional[tuple[_Held, str]] = None
        for _ in range(MAX_TRIES):
            if _link(tmp, self.path):
                if taken_over is not None:
                    held, reason = taken_over
                    log.warning("took over the run lock %s from %s: %s", self.path, _holder(held), reason)
                return
            held = self._read()
            if held is None:
                continue
            reason = self._death_reason(held, mine)
            if reason is None:
                raise DirectoryLocked(self._locked_message(held, mine))
            if self._bury(held):
                taken_over = (held, reason)
        raise DirectoryLocked(
            f"could not take the run lock {self.path} of checkpoint.dir {self.directory} "
            f"in {MAX_TRIES} tries: other runs keep taking it. Make sure only one run uses this "
            "checkpoint.dir, then try again."
        )

    def _death_reason(self, held: _Held, mine: LockRecord) -> Optional[str]:
        """Why the holder of ``held`` is dead, or None if it is alive."""
        now = time.time()
        record = held.record
        if record is None:
            age = now - held.mtime
            if age < self.stale_after:
                return None
            return f"its record is unreadable and was last modified {age:.0f} s ago"
        if record.host == mine.host:
            if record.pid == mine.pid and record.pid_start == mine.pid_start:
                return "it was left by this same process"
            return _same_host_death(record)
        requeued = record.job_id is not None and record.job_id == mine.job_id
        if requeued and mine.restart_count > record.restart_count:
            return f"it was incarnation {record.restart_count} of requeued job {record.job_id}"
        age = now - record.heartbeat
        if age < self.stale_after:
            return None
        return f"its heartbeat is {age:.0f} s old"

    def _locked_message(self, held: _Held, mine: LockRecord) -> str:
        now = time.time()
        stale = f"{self.stale_after:.0f} s, after which it is taken over automatically."
        record = held.record
        if record is None:
            return (
                f"checkpoint.dir {self.directory} is locked by another run, but its lock record {self.path} "
                "is unreadable (still being written, or not a megamm lock); it was last modified "
                f"{max(0.0, now - held.mtime):.0f} s ago. Wait for that run or stop it, or choose another "
                f"checkpoint.dir. If you are sure no run uses this directory, delete the lock file, "
                f"or wait until it is older than {stale}"
            )
        if record.host == mine.host:
            fix = (
                f"It runs on this host, so the lock is taken over as soon as PID {record.pid} exits; "
                f"if PID {record.pid} is an unrelated process, delete the lock file {self.path}."
            )
        else:
            fix = (
                "If you are sure it is dead (say its node is down), delete the lock file "
                f"{self.path}, or wait until its heartbeat is older than {stale}"
            )
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))
        return (
            f"checkpoint.dir {self.directory} is in use by another run: {record.describe()}, started "
            f"{started}, last heartbeat {max(0.0, now - record.heartbeat):.0f} s ago. Wait for it to "
            f"finish or stop it, or choose another checkpoint.dir. {fix}"
        )

    def _bury(self, held: _Held) -> bool:
        """Move the lock judged dead out of the way; False if it had changed (then it is put back)."""
        current = self._read()
        if current is None or current.raw != held.raw:
            return False
        grave = self.directory / f".{LOCK_NAME}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False
        try:
            if grave.read_bytes() == held.raw:
                return True
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            grave.unlink(missing_ok=True)

    def _remove_if_ours(self, token: str) -> None:
        grave = self.directory / f".{LOCK_NAME}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        try:
            held = _parse(grave.read_bytes(), 0.0)
            if held.record is None or held.record.token != token:
                try:
                    os.link(grave, self.path)
                except FileExistsError:
                    pass
        finally:
            grave.unlink(missing_ok=True)

    def _read(self) -> Optional[_Held]:
        """The lock file as it is now, or None if there is none."""
        try:
            with open(self.path, "rb") as handle:
                return _parse(handle.read(), os.fstat(handle.fileno()).st_mtime)
        except FileNotFoundError:
            return None

    def _loss(self, held: Optional[_Held], token: str) -> Optional[str]:
        """Why the lock file ``held`` is no longer ours, or None if it holds ``token``."""
        if held is None:
            return (
                f"the run lock {self.path} has disappeared; another run may be writing into "
                f"checkpoint.dir {self.directory}"
            )
        if held.record is None:
            return (
                f"the run lock {self.path} now holds an unreadable record; "
                "another run may have taken it over"
            )
        if held.record.token != token:
            return (
                f"the run lock {self.path} of checkpoint.dir {self.directory} was taken over by "
                f"{held.record.describe()}; this run must stop writing checkpoints there"
            )
        return None

    def _temp_path(self) -> Path:
        return self.directory / f".{LOCK_NAME}.{uuid.uuid4().hex}.tmp"

    def _start_heartbeat(self, record: LockRecord) -> None:
        self._record = record
        self._lost = None
        self._beat_error = None
        self._last_beat = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, name="megamm-runlock-heartbeat", daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                if not self._beat():
                    return
                self._beat_error = None
            except OSError as error:
                self._beat_error = error
            except BaseException as error:
                self._beat_error = error
                return

    def _beat(self) -> bool:
        """Refresh our heartbeat; False once the lock is lost (or released)."""
        held = self._read()
        if held is None and not self._stop.wait(MISSING_GRACE):
            held = self._read()
        with self._mutex:
            record = self._record
            if record is None or self._stop.is_set():
                return False
            lost = self._loss(held, record.token)
            if lost is not None:
                self._lost = lost
                return False
            now = time.time()
            fresh = dataclasses.replace(record, heartbeat=now)
            tmp = self._temp_path()
            try:
                _write_synced(tmp, fresh.to_json().encode("utf-8"))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            self._record = fresh
            self._last_beat = now
            return True


def process_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), or None."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields 3 onwards of /proc/<pid>/stat (after the parenthesised command name), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 1 :].split()


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_host_death(record: LockRecord) -> Optional[str]:
    """Why a holder on this host is dead, or None if it runs."""
    if not _pid_exists(record.pid):
        return f"PID {record.pid} no longer runs on this host"
    fields = _proc_stat(record.pid)
    if fields is None:
        return None
    if fields[0] in ("Z", "X"):
        return f"PID {record.pid} has exited (it is a zombie)"
    if record.pid_start is not None and len(fields) > 19 and fields[19] != record.pid_start:
        return f"PID {record.pid} now belongs to another process (its start time differs)"
    return None


def _restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"lock record field {key!r} is missing or has the wrong type: {value!r}")
    return value


def _parse(raw: bytes, mtime: float) -> _Held:
    try:
        record: Optional[LockRecord] = LockRecord.from_json(raw)
    except (ValueError, RecursionError):
        record = None
    return _Held(raw=raw, record=record, mtime=mtime)


def _holder(held: _Held) -> str:
    return held.record.describe() if held.record is not None else "an unknown holder"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _link(tmp: Path, lock: Path) -> bool:
    """Hard-link ``tmp`` to ``lock``; True if ``lock`` is now ``tmp``."""
    try:
        os.link(tmp, lock)
    except FileExistsError:
        return os.stat(tmp).st_nlink == 2
    return True


def _make_directory(directory: Path) -> list[Path]:
    """Create ``directory`` and missing parents; the ones created, deepest first."""
    missing = []
    path = directory.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove ``directories`` (deepest first) as long as they are empty."""
    for path in directories:
        try:
            path.rmdir()
        except OSError:
            return
