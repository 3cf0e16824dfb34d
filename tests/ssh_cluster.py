"""A throwaway ssh "cluster" on loopback for real multi-node launches: one sshd per node.

Each sshd runs in its own UTS, mount and PID namespace (``unshare``) with host name ``nodeI``, a
private ``/etc/hosts`` bind-mounted over the real one (``nodeI`` -> ``127.0.1.I``), ``ListenAddress
127.0.1.I`` and a port of its own. Host key and client key are generated into the cluster's temp dir.
Clients reach the nodes by name through an ``ssh_config`` that a tiny ``ssh`` wrapper script, first in
``env["PATH"]``, passes to the real ssh: DeepSpeed's ssh check, pdsh and MPICH's hydra all call plain
``ssh``. The real ``/etc/hosts`` and ``~/.ssh`` are never touched.

A node-local directory simulates storage that is not shared: each path given as ``node_local`` is, inside
every node's mount namespace, a bind mount of a private per-node directory, so what a process on node1
writes there is invisible on node2 (and to the test, which reads it through :meth:`SshCluster.private_dir`).

``stop()`` (also run at exit) ends every sshd by PID; a node's PID namespace takes every process started
over ssh on that node along with it.

Usage::

    from tests.ssh_cluster import ssh_cluster  # noqa: F401   (the pytest fixture)

    def test_x(ssh_cluster, tmp_path):
        hosts = ssh_cluster.write_hostfile(tmp_path / "hosts")      # node1 slots=2 / node2 slots=2
        subprocess.run(["deepspeed", "--hostfile", str(hosts), ...], env=ssh_cluster.env)
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import pytest

from tests.slurm_cluster import _find, _free_ports, _tail, install_missing, node_argv, terminate, write_node_init, write_private_hosts

__all__ = ["ssh_cluster", "SshCluster", "SshClusterError"]

PACKAGES = ("pdsh", "openssh-server", "openssh-client")
PROGRAMS = ("sshd", "ssh", "ssh-keygen", "pdsh", "unshare", "mount")
START_TIMEOUT = 20.0
# Variables of an outer launcher or SLURM job: a launch from the test must not inherit them.
OUTER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
OUTER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "OMPI_", "HYDRA_")


class SshClusterError(RuntimeError):
    pass


def ensure_ssh_installed() -> None:
    """Install pdsh, sshd and the ssh client with apt-get when any is missing (root only); raise if impossible."""
    install_missing("ssh test cluster", PROGRAMS, PACKAGES, SshClusterError, ["-o", "DPkg::Lock::Timeout=300"])


class SshCluster:
    """``num_nodes`` sshd on loopback (``node1`` on 127.0.1.1, ...), all state under ``root`` (a temp dir).

    ``env``: the environment to launch with (the caller's less any outer launcher's or SLURM's variables;
    ``PATH`` starts with the ``ssh`` wrapper, then this Python's bin dir; ``PDSH_RCMD_TYPE=ssh``).
    ``node_local``: paths that each node sees as a private directory of its own (created if absent).
    """

    def __init__(
        self,
        root: Union[str, Path],
        num_nodes: int = 2,
        slots: int = 2,
        node_local: Sequence[Union[str, Path]] = (),
    ) -> None:
        if not 1 <= num_nodes <= 254:
            raise ValueError("num_nodes must be in 1..254")
        self.root = Path(root).resolve()
        self.slots = slots
        self.nodes = [f"node{i}" for i in range(1, num_nodes + 1)]
        self.addresses = {node: f"127.0.1.{i}" for i, node in enumerate(self.nodes, start=1)}
        self.ports: dict[str, int] = {}
        self.node_local = [Path(path).resolve() for path in node_local]
        self.key_dir = self.root / "keys"
        self.bin_dir = self.root / "bin"
        self.log_dir = self.root / "log"
        self.ssh_config = self.root / "ssh_config"
        self.hosts_path = self.root / "hosts"
        self._procs: dict[str, subprocess.Popen] = {}
        self._outs: list = []
        self.env = self._client_env()
        self.started = False

    # ------------------------------------------------------------------ set-up
    def _client_env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k not in OUTER_VARIABLES and not k.startswith(OUTER_PREFIXES)
        }
        path = [str(self.bin_dir), str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")]
        env["PATH"] = ":".join(path)
        env["PDSH_RCMD_TYPE"] = "ssh"
        return env

    def private_dir(self, node: str, path: Union[str, Path]) -> Path:
        """Where the node-local ``path`` of ``node`` really lives (readable from the test's namespace)."""
        index = self.node_local.index(Path(path).resolve())
        return self.root / "node-local" / node / str(index)

    def _prepare(self) -> None:
        for directory in (self.key_dir, self.bin_dir, self.log_dir):
            directory.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
        for path in self.node_local:
            path.mkdir(parents=True, exist_ok=True)  # the mount point
            for node in self.nodes:
                self.private_dir(node, path).mkdir(parents=True, exist_ok=True)
        keygen = _find("ssh-keygen") or "ssh-keygen"
        for key in ("host_key", "client_key"):
            if not (self.key_dir / key).exists():
                argv = [keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"megamm-test-{key}", "-f", str(self.key_dir / key)]
                subprocess.run(argv, check=True, capture_output=True)
        shutil.copyfile(self.key_dir / "client_key.pub", self.key_dir / "authorized_keys")
        self._write_hosts()
        self._write_client_files()

    def _write_hosts(self) -> None:
        write_private_hosts(self.hosts_path, "the ssh test cluster", self.addresses)

    def _write_client_files(self) -> None:
        blocks = []
        for node in self.nodes:
            blocks.append(
                f"Host {node}\n  HostName {self.addresses[node]}\n  Port {self.ports[node]}\n"
                f"  IdentityFile {self.key_dir / 'client_key'}\n  IdentitiesOnly yes\n  User root\n"
                "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n"
                "  ConnectTimeout 10\n  LogLevel ERROR\n"
            )
        self.ssh_config.write_text("\n".join(blocks))
        wrapper = self.bin_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {_find("ssh") or "/usr/bin/ssh"} -F {self.ssh_config} "$@"\n')
        wrapper.chmod(0o755)

    def sshd_config(self, node: str) -> str:
        keys = self.key_dir
        return "\n".join([
            f"Port {self.ports[node]}",
            f"ListenAddress {self.addresses[node]}",
            f"HostKey {keys / 'host_key'}",
            f"AuthorizedKeysFile {keys / 'authorized_keys'}",
            "PidFile none",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "X11Forwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 64:30:128",
            "MaxSessions 64",
            "LogLevel INFO",
        ]) + "\n"

    # ------------------------------------------------------------------ daemons
    def _start_sshd(self, node: str) -> None:
        config = self.root / f"sshd_config.{node}"
        config.write_text(self.sshd_config(node))
        init = write_node_init(self.root / "node_init.py")
        sshd = _find("sshd") or "/usr/sbin/sshd"  # sshd re-executes itself: it needs an absolute path
        binds = [(self.private_dir(node, path), path) for path in self.node_local]
        argv = node_argv(init, self.hosts_path, node, [sshd, "-D", "-e", "-f", str(config)], binds)
        out = open(self.log_dir / f"sshd-{node}.log", "ab")
        self._outs.append(out)
        setpriv = _find("setpriv")
        # sshd dies with this process (even on SIGKILL) instead of outliving the test session.
        prefix = [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []
        self._procs[node] = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
            start_new_session=True,
        )

    def _wait_for_node(self, node: str) -> None:
        """Until ``ssh node hostname`` answers ``node`` (or raise with the sshd log's tail)."""
        deadline = time.monotonic() + START_TIMEOUT
        answer = ""
        while time.monotonic() < deadline:
            proc = self._procs[node]
            if proc.poll() is not None:
                self._fail(f"sshd on {node} exited with code {proc.returncode}", node)
            try:
                result = self.ssh(node, "hostname", timeout=10)
                answer = (result.stdout + result.stderr).strip()
                if result.returncode == 0 and answer == node:
                    return
            except subprocess.TimeoutExpired:
                answer = "<timeout>"
            time.sleep(0.1)
        self._fail(f"`ssh {node} hostname` did not answer {node!r} (last: {answer!r})", node)

    def _fail(self, what: str, node: str) -> None:
        log = self.log_dir / f"sshd-{node}.log"
        raise SshClusterError(f"ssh test cluster: {what} (within {START_TIMEOUT:.0f} s)\n--- {log} ---\n{_tail(log)}")

    def start(self) -> "SshCluster":
        """Install what is missing, start one sshd per node and wait until each answers over ssh."""
        if self.started:
            return self
        if os.geteuid() != 0:
            raise SshClusterError("ssh test cluster: needs root (unshare, mount --bind, sshd)")
        ensure_ssh_installed()
        self.started = True
        _LIVE.add(self)
        try:
            for attempt in range(3):  # another process may take a port between the check and the bind
                self.ports = dict(zip(self.nodes, _free_ports(len(self.nodes))))
                self._prepare()
                try:
                    for node in self.nodes:
                        self._start_sshd(node)
                    for node in self.nodes:
                        self._wait_for_node(node)
                    break
                except SshClusterError as error:
                    self._terminate(5.0)
                    if attempt == 2 or "Address already in use" not in str(error):
                        raise
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every sshd (through its namespace's init), SIGKILL after ``grace`` s; each node's PID
        namespace dies with it, taking every process started over ssh on that node along."""
        if not self.started:
            return
        self.started = False
        _LIVE.discard(self)
        self._terminate(grace)
        for out in self._outs:
            out.close()
        self._outs.clear()

    def _terminate(self, grace: float) -> None:
        procs, self._procs = self._procs, {}
        terminate(procs.values(), grace, nodes=True)

    def __enter__(self) -> "SshCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    def ssh(self, node: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``ssh node command`` through the wrapper; text output captured."""
        return subprocess.run(
            ["ssh", node, command], env=self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def write_hostfile(self, path: Union[str, Path], slots: Optional[int] = None) -> Path:
        """A DeepSpeed hostfile naming every node (``node1 slots=2`` ...); returns its path."""
        path = Path(path)
        path.write_text("".join(f"{node} slots={slots or self.slots}\n" for node in self.nodes))
        return path

    def log_tails(self, lines: int = 30) -> str:
        """The end of every sshd log, for a failing test's message."""
        logs = sorted(self.log_dir.glob("*.log"))
        return "\n".join(f"--- {log} ---\n{_tail(log, lines)}" for log in logs)


_LIVE: "weakref.WeakSet[SshCluster]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_LIVE):
        cluster.stop()


@pytest.fixture
def ssh_cluster(tmp_path_factory) -> Iterator[SshCluster]:
    """A started 2-node ssh cluster (node1, node2 with 2 slots each) and a node-local dir
    (``ssh_cluster.node_local[0]``); stopped, with everything started on its nodes, after the test."""
    root = tmp_path_factory.mktemp("ssh")
    with SshCluster(root, node_local=[root / "node-local-mount"]) as cluster:
        yield cluster
