"""A throwaway SLURM cluster on loopback for real tests: munged, slurmctld and two slurmd nodes.

Each slurmd runs in its own UTS, mount and PID namespace (``unshare``) with host name ``nodeI``, a
private ``/etc/hosts`` bind-mounted over the real one (``nodeI`` -> ``127.0.1.I``) and its own port,
spool dir and log, so a 2-node job sees two distinct hosts on one machine. slurmctld, munged and the
client commands (sbatch, squeue, scontrol, scancel) run in the caller's namespaces: the nodes are
reached through ``NodeAddr`` and the controller through ``SlurmctldHost=<hostname>(127.0.0.1)``, so the
real ``/etc/hosts`` is never edited. Everything lives in one temp dir (config, state, spool, logs);
``stop()`` kills every daemon by PID, and a node's PID namespace takes its job processes with it.

Usage::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401   (the pytest fixture)

    def test_x(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch(script, sbatch_options=["-N2", "--ntasks-per-node=2"])
        assert slurm_cluster.wait(job, timeout=60) == "COMPLETED"

Client commands need ``env=cluster.env`` (it sets ``SLURM_CONF``); jobs inherit it from sbatch.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "unshare", "mount")
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")

# A job in one of these states has ended for good (a requeued job passes through PENDING/REQUEUED instead).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)
START_TIMEOUT = 20.0

# PID 1 of a node's PID namespace: bind-mounts the private hosts file, sets the host name, runs slurmd,
# forwards SIGTERM/SIGINT to it, reaps orphans (finished slurmstepd), and exits when slurmd does (the
# kernel then kills whatever is left in the namespace).
_NODE_INIT = r"""
import json, os, signal, socket, subprocess, sys
spec, cmd = json.loads(sys.argv[1]), sys.argv[2:]
for source, target in [(spec["hosts"], "/etc/hosts"), *spec["binds"]]:
    subprocess.run(["mount", "--bind", source, target], check=True)
socket.sethostname(spec["name"])
pid = os.fork()
if pid == 0:
    os.execvp(cmd[0], cmd)
def forward(sig, frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
while True:
    try:
        done, status = os.wait()
    except ChildProcessError:
        sys.exit(1)
    if done == pid:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def node_argv(
    init: Path, hosts: Path, name: str, command: Sequence[str], binds: Sequence[tuple[Path, Path]] = ()
) -> list[str]:
    """``command`` as the one child of a new node: its own UTS, mount and PID namespace, host name
    ``name``, ``hosts`` bind-mounted over /etc/hosts and each ``(source, target)`` of ``binds``
    bind-mounted too. ``init`` is where :data:`_NODE_INIT` was written (see :func:`write_node_init`)."""
    spec = {"hosts": str(hosts), "name": name, "binds": [[str(source), str(target)] for source, target in binds]}
    return [
        _find("unshare") or "unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL",
        sys.executable, "-I", str(init), json.dumps(spec), *command,
    ]


def write_node_init(path: Path) -> Path:
    """Write the node namespaces' PID 1 program to ``path``."""
    path.write_text(_NODE_INIT)
    return path


def write_private_hosts(path: Path, owner: str, addresses: Mapping[str, str]) -> None:
    """A hosts file for the nodes' namespaces: ``addresses`` (name -> address), then the real /etc/hosts.

    Our names come first: the first match wins, and the real file may map this host's name to 127.0.1.1.
    """
    lines = [f"# private hosts file of {owner}", *(f"{address} {name}" for name, address in addresses.items())]
    try:
        real = Path("/etc/hosts").read_text()
    except OSError:
        real = "127.0.0.1 localhost\n"
    path.write_text("\n".join(lines) + "\n" + real)


def _node_init_pid(proc: subprocess.Popen) -> Optional[int]:
    """The host PID of a node's namespace init (the child of ``unshare --fork``; through setpriv's exec)."""
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def terminate(procs: Iterable[subprocess.Popen], grace: float, nodes: bool) -> None:
    """SIGTERM ``procs``, SIGKILL what is left after ``grace`` s. ``nodes``: they are :func:`node_argv`
    processes, signalled through their namespace's init (unshare ignores SIGTERM); when the init
    dies, the kernel kills the rest of its namespace."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            _kill((_node_init_pid(proc) if nodes else None) or proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            init = _node_init_pid(proc) if nodes else None
            if init:
                _kill(init, signal.SIGKILL)
            _kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class SlurmError(RuntimeError):
    pass


def _find(program: str) -> Optional[str]:
    found = shutil.which(program)
    if found:
        return found
    for directory in SBIN_DIRS:
        path = os.path.join(directory, program)
        if os.access(path, os.X_OK):
            return path
    return None


def install_missing(
    what: str, programs: Sequence[str], packages: Sequence[str], error: type[Exception], apt_options: Sequence[str] = ()
) -> None:
    """Install ``packages`` with apt-get when any of ``programs`` is missing (root only); raise
    ``error``, naming ``what`` needs them, if that is impossible or fails."""

    def missing() -> list[str]:
        return [program for program in programs if _find(program) is None]

    if not missing():
        return
    install = ["apt-get", "install", "-y", *apt_options, *packages]
    if os.geteuid() != 0:
        raise error(f"{what}: programs {missing()} are missing and installing them needs root: run `{' '.join(install)}`")
    if not shutil.which("apt-get"):
        raise error(f"{what}: programs {missing()} are missing and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(os.path.join(tempfile.gettempdir(), "megamm-apt-install.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several pytest processes at once: one apt-get at a time
        if not missing():
            return
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:  # stale package lists: refresh them once and retry
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
            result = subprocess.run(install, env=env, capture_output=True, text=True)
    if result.returncode != 0 or missing():
        raise error(
            f"{what}: `{' '.join(install)}` failed (rc={result.returncode}, still missing {missing()}):\n"
            f"{(result.stdout + result.stderr)[-3000:]}"
        )


def ensure_slurm_installed() -> None:
    """Install slurmctld, slurmd, the SLURM clients and munge with apt-get when any is missing (root only)."""
    install_missing("SLURM test cluster", PROGRAMS, PACKAGES, SlurmError, ["--no-install-recommends"])


def _port_is_free(port: int) -> bool:
    # The daemons listen on all addresses (SLURM 22.05 has no bind-address setting), so test the wildcard.
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1")):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((addr, port))
            except OSError:
                return False
    return True


def _free_ports(count: int, avoid: Sequence[int] = ()) -> list[int]:
    """``count`` distinct free TCP ports below the kernel's ephemeral range (so no client socket takes them)."""
    ports: list[int] = []
    rng = random.Random()
    for _ in range(5000):
        port = rng.randrange(20000, 32000)
        if port not in ports and port not in avoid and _port_is_free(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise SlurmError("SLURM test cluster: found no free TCP ports in 20000-32000")


def _tail(path: Union[str, Path], lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as error:
        return f"<{path}: {error}>"
    return "\n".join(text.splitlines()[-lines:])


def parse_scontrol_record(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces ...`` (one ``scontrol show ... -o`` record) as a dict."""
    fields: dict[str, str] = {}
    for part in re.split(r"\s+(?=[A-Za-z][\w/:.\-]*=)", line.strip()):
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value.strip()
    return fields


class JobState(str):
    """A job's final state (compares equal to e.g. ``"COMPLETED"``) with its restart count and record."""

    restarts: int
    exit_code: str
    info: dict

    def __new__(cls, state: str, info: Mapping[str, str]) -> "JobState":
        self = super().__new__(cls, state)
        self.info = dict(info)
        self.restarts = int(info.get("Restarts", "0") or 0)
        self.exit_code = info.get("ExitCode", "")
        return self


class SlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd on loopback, all under ``root`` (a private temp dir).

    ``env``: the environment for client commands (the caller's, less any outer SLURM_* variables,
    plus ``SLURM_CONF``); jobs inherit it from sbatch. ``nodes``: ["node1", "node2"]; ``addresses``:
    {"node1": "127.0.1.1", ...}. ``extra_conf``: more slurm.conf lines (later lines override earlier).
    """

    def __init__(
        self,
        root: Union[str, Path],
        num_nodes: int = 2,
        cpus_per_node: int = 2,
        kill_wait: int = 2,
        extra_conf: Sequence[str] = (),
    ) -> None:
        if not 1 <= num_nodes <= 254:
            raise ValueError("num_nodes must be in 1..254")
        self.root = Path(root).resolve()
        self.num_nodes = num_nodes
        self.cpus_per_node = cpus_per_node
        self.kill_wait = kill_wait
        self.extra_conf = list(extra_conf)
        self.nodes = [f"node{i}" for i in range(1, num_nodes + 1)]
        self.addresses = {node: f"127.0.1.{i}" for i, node in enumerate(self.nodes, start=1)}
        self.controller = socket.gethostname().split(".")[0] or "localhost"
        self.controller_address = "127.0.0.1"
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.hosts_path = self.root / "etc" / "hosts"
        self.log_dir = self.root / "log"
        self.job_dir = self.root / "jobs"
        self._short_dir: Optional[Path] = None  # runtime dir for unix sockets when root's path is long
        self.run_dir = self.root / "run"
        self.ctld_port = 0
        self.node_ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._outs: list = []
        self.env = self._client_env()
        self.started = False
        self.start_seconds: Optional[float] = None

    # ------------------------------------------------------------------ set-up
    def _client_env(self) -> dict[str, str]:
        outer = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_", "SCONTROL_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(outer)}
        env["SLURM_CONF"] = str(self.conf_path)
        env.pop("MUNGE_SOCKET", None)
        return env

    def _prepare_dirs(self) -> None:
        for directory in (self.root / "etc", self.log_dir, self.job_dir, self.root / "state", self.root / "tmpfs"):
            directory.mkdir(parents=True, exist_ok=True)
        # slurmstepd's unix sockets live in the spool dirs and munged's in run/munge: keep the paths well
        # under the 108-byte limit of a unix socket path.
        if len(str(self.root)) > 56:
            self._short_dir = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
            self.run_dir = self._short_dir
        else:
            self.run_dir.mkdir(exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        (self.run_dir / "munge").mkdir(exist_ok=True)
        os.chmod(self.run_dir / "munge", 0o755)  # munged insists on a socket dir it considers safe
        for node in self.nodes:
            (self.run_dir / "spool" / node).mkdir(parents=True, exist_ok=True)

    @property
    def munge_socket(self) -> Path:
        return self.run_dir / "munge" / "munge.socket"

    def _write_hosts(self) -> None:
        entries = {self.controller: self.controller_address, **self.addresses}
        write_private_hosts(self.hosts_path, "the SLURM test cluster", entries)

    def slurm_conf(self) -> str:
        run, root = self.run_dir, self.root
        memory = _mem_total_mb()
        lines = [
            "ClusterName=megammtest",
            f"SlurmctldHost={self.controller}({self.controller_address})",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={run / 'spool'}/%n",
            f"SlurmctldPidFile={run / 'slurmctld.pid'}",
            f"SlurmdPidFile={run / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"TmpFS={root / 'tmpfs'}",
            "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobRequeue=1",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "SchedulerParameters=sched_interval=1,bf_interval=1",
            f"KillWait={self.kill_wait}",
            "MinJobAge=3600",
            "InactiveLimit=0",
            *self.extra_conf,
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeAddr={self.addresses[node]} NodeHostname={node} Port={self.node_ports[node]} "
                f"CPUs={self.cpus_per_node} Sockets=1 CoresPerSocket={self.cpus_per_node} ThreadsPerCore=1 "
                f"RealMemory={memory} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        out = open(self.log_dir / f"{name}.out", "ab")
        self._outs.append(out)
        setpriv = _find("setpriv")
        # The daemons die with this process (even on SIGKILL) instead of outliving the test session.
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        proc = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self._daemon_env(),
            cwd=self.root, start_new_session=True,
        )
        self._procs[name] = proc
        return proc

    def _daemon_env(self) -> dict[str, str]:
        env = dict(self.env)
        env["PATH"] = env.get("PATH", "") + ":" + ":".join(SBIN_DIRS)
        return env

    def _fail(self, what: str, logs: Sequence[Union[str, Path]]) -> None:
        tails = "\n".join(f"--- {log} (tail) ---\n{_tail(log)}" for log in logs)
        raise SlurmError(f"SLURM test cluster: {what} (within {START_TIMEOUT:.0f} s)\n{tails}")

    def _wait_until(self, check, name: str, what: str, logs: Sequence[Union[str, Path]]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                self._fail(f"{name} exited with code {proc.returncode} before {what}", logs)
            if check():
                return
            if time.monotonic() > deadline:
                self._fail(f"{name}: no {what}", logs)
            time.sleep(0.1)

    def _start_munge(self) -> None:
        key = self.run_dir / "munge" / "munge.key"
        if not key.exists():
            with open(key, "wb") as f:
                f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn(
            "munged",
            [
                _find("munged") or "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                f"--pid-file={self.run_dir / 'munge' / 'munged.pid'}", f"--log-file={self.log_dir / 'munged.log'}",
                f"--seed-file={self.run_dir / 'munge' / 'munged.seed'}", "--num-threads=4",
            ],
        )
        self._wait_until(self.munge_socket.exists, "munged", "socket", [self.log_dir / "munged.out"])

    def _start_slurmctld(self) -> None:
        self._spawn("slurmctld", [_find("slurmctld") or "slurmctld", "-D"])

        def up() -> bool:
            result = self._client(["scontrol", "ping"], check=False, timeout=10)
            return result.returncode == 0 and "UP" in result.stdout

        logs = [self.log_dir / "slurmctld.log", self.log_dir / "slurmctld.out"]
        self._wait_until(up, "slurmctld", "answer to `scontrol ping`", logs)

    def _start_slurmd(self, node: str) -> None:
        init = self.root / "etc" / "node_init.py"
        if not init.exists():
            write_node_init(init)
        argv = node_argv(init, self.hosts_path, node, [_find("slurmd") or "slurmd", "-D", "-N", node])
        self._spawn(f"slurmd-{node}", argv)

    def _node_states(self) -> dict[str, str]:
        result = self._client(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
        states = {}
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def start(self) -> "SlurmCluster":
        """Start munged, slurmctld and the nodes; return once every node is idle (or raise with log tails)."""
        if self.started:
            return self
        if os.geteuid() != 0:
            raise SlurmError("SLURM test cluster: needs root (unshare, mount --bind, slurmd as root)")
        ensure_slurm_installed()
        began = time.monotonic()
        self.started = True
        _LIVE.add(self)
        try:
            self._prepare_dirs()
            self._write_hosts()
            self._start_munge()
            for attempt in range(3):  # another process may take a port between the check and the bind
                ports = _free_ports(1 + self.num_nodes)
                self.ctld_port = ports[0]
                self.node_ports = dict(zip(self.nodes, ports[1:]))
                self.conf_path.write_text(self.slurm_conf())
                try:
                    self._start_slurmctld()
                    break
                except SlurmError as error:
                    if attempt == 2 or "Address already in use" not in str(error):
                        raise
                    self._terminate(["slurmctld"], 5.0)
            for node in self.nodes:
                self._start_slurmd(node)
            self._wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _wait_for_nodes(self) -> None:
        logs = [self.log_dir / f"slurmd-{n}.{ext}" for n in self.nodes for ext in ("log", "out")]
        logs.append(self.log_dir / "slurmctld.log")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for node in self.nodes:
                proc = self._procs[f"slurmd-{node}"]
                if proc.poll() is not None:
                    self._fail(f"slurmd on {node} exited with code {proc.returncode}", logs)
            states = self._node_states()
            if all(states.get(node) == "idle" for node in self.nodes):
                return
            if time.monotonic() > deadline:
                self._fail(f"nodes not idle: {states}", logs)
            time.sleep(0.1)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every daemon started here (nodes, then slurmctld, then munged), SIGKILL after ``grace`` s.
        A node's PID namespace dies with its slurmd, taking its job steps and tasks along."""
        if not self.started:
            return
        self.started = False
        _LIVE.discard(self)
        self._terminate([n for n in self._procs if n.startswith("slurmd-")], grace)
        self._terminate(["slurmctld"], grace)
        self._terminate(["munged"], grace)
        self._procs.clear()
        for out in self._outs:
            out.close()
        self._outs.clear()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)
            self._short_dir = None

    def _terminate(self, names: Sequence[str], grace: float) -> None:
        procs = {name: self._procs.pop(name) for name in names if name in self._procs}
        terminate(procs.values(), grace, nodes=all(name.startswith("slurmd-") for name in procs))

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    def _client(self, argv: Sequence[str], check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise SlurmError(f"`{' '.join(map(str, argv))}` failed (rc={result.returncode}): {result.stdout}{result.stderr}")
        return result

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a client command (``squeue``, ``sinfo``, ...) against this cluster; text output captured."""
        return self._client(argv, check=check, timeout=timeout)

    def sbatch(
        self,
        script_path: Union[str, Path],
        *args: str,
        sbatch_options: Sequence[str] = (),
        cwd: Optional[Union[str, Path]] = None,
        env_extra: Optional[Mapping[str, str]] = None,
    ) -> int:
        """Submit ``script_path args...``; returns the job id. ``cwd`` (default: the script's dir) is the
        job's working dir; ``env_extra`` adds variables to the submitting (and so the job's) environment."""
        env = dict(self.env)
        env.update(env_extra or {})
        script = Path(script_path).resolve()
        result = self._client(
            ["sbatch", "--parsable", *sbatch_options, str(script), *map(str, args)], env=env, cwd=str(cwd or script.parent)
        )
        return int(result.stdout.strip().splitlines()[-1].split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o JOB`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``NodeList``...);
        {} when SLURM does not know the job."""
        result = self._client(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        line = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
        if result.returncode == 0 and line.startswith("JobId="):
            return parse_scontrol_record(line)
        if "Invalid job id" in result.stderr + result.stdout:
            return {}
        raise SlurmError(f"`scontrol show job {job_id}` failed (rc={result.returncode}): {result.stdout}{result.stderr}")

    def wait(self, job_id: int, timeout: float = 120, poll: float = 0.2, cancel_on_timeout: bool = True) -> JobState:
        """Poll until the job has ended for good; a requeued job (back to PENDING) is waited for again.
        Returns its final state (a str, e.g. "COMPLETED", with ``.restarts``, ``.exit_code`` and ``.info``).
        On timeout the job is cancelled (unless ``cancel_on_timeout`` is false) and TimeoutError raised."""
        deadline = time.monotonic() + timeout
        seen_terminal = None
        info: dict[str, str] = {}
        while True:
            info = self.job_info(job_id)
            if not info:
                raise SlurmError(f"SLURM test cluster: job {job_id} unknown to slurmctld")
            state = info.get("JobState", "")
            if state in TERMINAL_STATES:
                # Seen twice in a row: a job that is requeued (NODE_FAIL, PREEMPTED) leaves this state at once.
                if seen_terminal == state:
                    return JobState(state, info)
                seen_terminal = state
            else:
                seen_terminal = None
            if time.monotonic() > deadline:
                if cancel_on_timeout:
                    self._client(["scancel", "-f", str(job_id)], check=False)
                raise TimeoutError(
                    f"SLURM job {job_id} still {state} after {timeout} s: {info}\n"
                    + "\n".join(f"--- {log.name} ---\n{_tail(log, 15)}" for log in self.logs())
                )
            time.sleep(poll)

    def scancel(self, job_id: int, *options: str) -> None:
        """``scancel OPTIONS JOB`` (e.g. ``"-b", "-s", "USR1"``)."""
        self._client(["scancel", *options, str(job_id)])

    def logs(self) -> list[Path]:
        return sorted(p for p in self.log_dir.glob("*") if p.is_file())

    def log_tails(self, lines: int = 30) -> str:
        """The end of every daemon log, for a failing test's message."""
        return "\n".join(f"--- {log} ---\n{_tail(log, lines)}" for log in self.logs())


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _mem_total_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return max(1024, int(line.split()[1]) // 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 4096


_LIVE: "weakref.WeakSet[SlurmCluster]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A started 2-node SLURM cluster (node1, node2 with 2 CPUs each), stopped at the end of the session."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    with cluster:
        yield cluster
