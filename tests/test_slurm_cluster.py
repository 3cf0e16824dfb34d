"""The throwaway SLURM cluster of tests/slurm_cluster.py: two hosts, requeue, signals, clean stop."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmError, slurm_cluster

# The fixture, imported so that pytest finds it; listed here so that pyflakes (which ignores noqa) sees it used.
__all__ = ["slurm_cluster"]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s\n{cluster.log_tails()}"
        time.sleep(0.1)


def _pids_with(token: str, argv0: bool = False) -> list[int]:
    """Host PIDs of the processes whose command line (or, with ``argv0``, whose argv[0]) contains ``token``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if token.encode() in (cmdline.split(b"\0")[0] if argv0 else cmdline):
                pids.append(int(entry))
    return pids


def test_slurm_cluster_runs_a_two_node_job(slurm_cluster, tmp_path):
    out = tmp_path / "tasks.txt"
    script = _script(tmp_path / "job.sh", "srun bash -c 'echo $(hostname) $SLURM_PROCID $SLURM_LOCALID'\n")
    job = slurm_cluster.sbatch(
        script, sbatch_options=["--nodes=2", "--ntasks-per-node=2", f"--output={out}", "--time=2"]
    )
    state = slurm_cluster.wait(job, timeout=60)
    assert state == "COMPLETED", (state.info, out.read_text() if out.exists() else "", slurm_cluster.log_tails())
    assert state.restarts == 0
    assert state.info["NodeList"] == "node[1-2]"
    lines = [line.split() for line in out.read_text().splitlines()]
    assert len(lines) == 4, lines
    assert {host for host, _, _ in lines} == {"node1", "node2"}
    for host in ("node1", "node2"):
        assert sorted(local for h, _, local in lines if h == host) == ["0", "1"], lines
    assert sorted(int(rank) for _, rank, _ in lines) == [0, 1, 2, 3]
    assert {host: {int(r) for h, r, _ in lines if h == host} for host in ("node1", "node2")} == {
        "node1": {0, 1},
        "node2": {2, 3},
    }


def test_slurm_node_sees_its_own_host_name_and_address(slurm_cluster, tmp_path):
    out = tmp_path / "names.txt"
    script = _script(
        tmp_path / "names.sh",
        "srun bash -c 'echo $(hostname) $(getent hosts $(hostname) | cut -d\" \" -f1) "
        "$(getent hosts node1 | cut -d\" \" -f1) $(getent hosts node2 | cut -d\" \" -f1)'\n",
    )
    job = slurm_cluster.sbatch(script, sbatch_options=["--nodes=2", "--ntasks-per-node=1", f"--output={out}"])
    assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", slurm_cluster.log_tails()
    assert sorted(out.read_text().split("\n")[:2]) == [
        "node1 127.0.1.1 127.0.1.1 127.0.1.2",
        "node2 127.0.1.2 127.0.1.1 127.0.1.2",
    ]


def test_slurm_requeued_job_reruns_with_restart_count(slurm_cluster, tmp_path):
    out = tmp_path / "requeue.txt"
    script = _script(
        tmp_path / "requeue.sh",
        'out="$1"\n'
        'if [ -z "$SLURM_RESTART_COUNT" ]; then\n'
        '  echo "first run" >> "$out"\n'
        '  scontrol requeue "$SLURM_JOB_ID"\n'
        "  sleep 30\n"
        "  exit 1\n"
        "fi\n"
        'echo "rerun $SLURM_RESTART_COUNT" >> "$out"\n',
    )
    started = time.monotonic()
    job = slurm_cluster.sbatch(script, str(out), sbatch_options=[f"--output={tmp_path / 'slurm-%j.out'}"])
    state = slurm_cluster.wait(job, timeout=60)
    elapsed = time.monotonic() - started
    assert state == "COMPLETED", (state.info, slurm_cluster.log_tails())
    assert state.restarts == 1
    assert out.read_text().splitlines() == ["first run", "rerun 1"]
    assert elapsed < 30, elapsed


def test_slurm_scancel_batch_signal_reaches_the_batch_shell(slurm_cluster, tmp_path):
    out = tmp_path / "signal.txt"
    script = _script(
        tmp_path / "signal.sh",
        'out="$1"\n'
        "got=0\n"
        "trap 'echo \"got USR1\" >> \"$out\"; got=1' USR1\n"
        "srun sleep 30 &\n"
        "pid=$!\n"
        'echo started >> "$out"\n'
        "# a trap runs only once the foreground command returns: wait (interruptible), not srun itself\n"
        'while [ "$got" = 0 ] && kill -0 "$pid" 2>/dev/null; do wait "$pid"; done\n'
        'kill -0 "$pid" 2>/dev/null && echo "srun still running" >> "$out"\n'
        'kill "$pid"; wait "$pid"\n'
        'echo "done $got" >> "$out"\n'
        "exit 0\n",
    )
    job = slurm_cluster.sbatch(script, str(out), sbatch_options=[f"--output={tmp_path / 'slurm-%j.out'}"])
    # the step is running once squeue lists it: then the shell is past `echo started`
    _wait_for(
        lambda: out.exists()
        and "started" in out.read_text()
        and slurm_cluster.run("squeue", "-h", "-s", "-j", str(job), "-o", "%i").stdout.strip() != "",
        30,
        "running step",
        slurm_cluster,
    )
    started = time.monotonic()
    slurm_cluster.scancel(job, "-b", "-s", "USR1")
    state = slurm_cluster.wait(job, timeout=30)
    assert state == "COMPLETED", (state.info, out.read_text(), slurm_cluster.log_tails())
    assert out.read_text().splitlines() == ["started", "got USR1", "srun still running", "done 1"]
    assert time.monotonic() - started < 15


def test_slurm_cluster_stop_kills_daemons_and_running_jobs(slurm_cluster, tmp_path):
    """A second cluster next to the session's one (other ports), stopped with a job still running."""
    token = f"megamm-slurm-stop-{uuid.uuid4().hex[:12]}"
    cluster = SlurmCluster(tmp_path / "cluster")
    with cluster:
        assert cluster.start_seconds is not None and cluster.start_seconds < 20
        ports = {cluster.ctld_port, *cluster.node_ports.values()}
        assert ports.isdisjoint({slurm_cluster.ctld_port, *slurm_cluster.node_ports.values()})
        daemons = [proc.pid for proc in cluster._procs.values()]
        script = _script(tmp_path / "hang.sh", f"srun bash -c 'exec -a {token} sleep 300'\n")
        job = cluster.sbatch(script, sbatch_options=["--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path / 'o'}"])
        _wait_for(lambda: len(_pids_with(token, argv0=True)) == 2, 30, "2 running tasks", cluster)
        assert cluster.job_info(job)["JobState"] == "RUNNING"
        started = time.monotonic()
    assert time.monotonic() - started < 10
    assert [pid for pid in daemons if Path(f"/proc/{pid}").exists()] == []
    assert _pids_with(token) == []
    assert _pids_with(str(cluster.root)) == []
    assert slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split() == ["node1", "idle", "node2", "idle"]


def test_slurm_cluster_start_failure_reports_the_log_and_cleans_up(tmp_path):
    cluster = SlurmCluster(tmp_path / "broken", extra_conf=["SelectType=select/no_such_plugin"])
    with pytest.raises(SlurmError, match="(?s)slurmctld exited.*no_such_plugin"):
        cluster.start()
    assert not cluster.started
    assert _pids_with(str(cluster.root)) == []
