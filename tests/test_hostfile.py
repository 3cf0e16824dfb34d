"""`deepspeed --hostfile` across two hosts on loopback: node1 and node2 with 2 ranks each, TP=2 x DP=2.

The hosts are sshd's in their own namespaces (tests/ssh_cluster.py) or slurmd's (tests/slurm_cluster.py);
the real pdsh, ssh, MPICH hydra and DeepSpeed runner do the launching. Ranks on the ssh nodes get their
environment from DeepSpeed's `.deepspeed_env` in the launch's working dir (one per test) and the venv
from `--venv_script`. Every launch names `--master_addr 127.0.1.1` and a free `--master_port`.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megamm.engine import free_port
from tests.launch import PRETRAIN, ROOT, overrides, tensorboard_events
from tests.slurm_cluster import SlurmCluster, slurm_cluster
from tests.ssh_cluster import SshCluster, ssh_cluster

__all__ = ["slurm_cluster", "ssh_cluster"]  # the fixtures, imported for pytest

STEPS = 4
MASTER_ADDR = "127.0.1.1"
LAUNCH_TIMEOUT = 240.0
VENV = Path(sys.prefix)
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR") or str(VENV / "torch_extensions")
# What every rank needs on every host (a remote shell starts from sshd's bare environment).
RANK_ENV = {
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR,
    "DS_ACCELERATOR": "cpu",
    "GLOO_SOCKET_IFNAME": "lo",
}
HOSTS_LINE = "hosts: node1 (ranks 0, 1), node2 (ranks 2, 3)"


@pytest.fixture(scope="module")
def shm_op() -> None:
    """Build (or load) DeepSpeed's CPU shm op once, so that no launch below compiles it on its clock."""
    code = (
        "from deepspeed.accelerator import get_accelerator; "
        "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR, DS_ACCELERATOR="cpu")
    # No timeout: a build killed midway leaves a lock behind that hangs every later start.
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _workdir(path: Path) -> Path:
    """A launch's own working dir with a `.deepspeed_env` (the runner exports it to every host)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / ".deepspeed_env").write_text("".join(f"{key}={value}\n" for key, value in RANK_ENV.items()))
    return path


def _script_args(data: dict[str, str], run_dir: Path, **changes: str) -> list[str]:
    """pretrain.py and its arguments: TP=2 on 4 ranks, absolute paths (the launch runs in a work dir)."""
    return [
        PRETRAIN, "--config", "clip_tiny", "--ds-config", str(ROOT / "ds_configs/zero3.json"),
        *overrides(data, run_dir, parallel__tensor_parallel="2", logging__log_interval="1", **changes),
    ]


def _executable(path: Path, body: str) -> Path:
    """A bash script at ``path``."""
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _hostfile_command(hosts: Path, port: int, *options: str) -> list[str]:
    return [DEEPSPEED, "--hostfile", str(hosts), "--master_addr", MASTER_ADDR, "--master_port", str(port), *options]


def _launch(cluster: SshCluster, command: list[str], workdir: Path) -> subprocess.CompletedProcess:
    """Run the runner in ``workdir`` in a session of its own; past the timeout kill its process group
    (what it started on the nodes dies with the cluster's namespaces). Output in ``workdir/launch.log``."""
    log_path = workdir / "launch.log"
    with open(log_path, "w") as log:
        runner = subprocess.Popen(
            command, cwd=workdir, env={**cluster.env, **RANK_ENV}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            runner.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if runner.poll() is None:
                os.killpg(runner.pid, signal.SIGKILL)
                runner.wait()
    return subprocess.CompletedProcess(command, runner.returncode, log_path.read_text(), "")


def _assert_trained(result: subprocess.CompletedProcess, run_dir: Path, port: int) -> None:
    """4 ranks over node1 and node2 trained STEPS steps, checkpointed and logged to TensorBoard."""
    output = result.stdout
    assert result.returncode == 0, output[-5000:]
    assert "4 ranks: tp=2 dp=2 zero=3" in output, output[-5000:]
    assert HOSTS_LINE in output, output[-5000:]
    assert (run_dir / "checkpoints" / f"global_step{STEPS}" / "megamm_complete.json").is_file()
    assert sorted(tensorboard_events(run_dir / "tensorboard", "train/loss")) == list(range(1, STEPS + 1))
    leaked = list(Path("/dev/shm").glob(f"*_{port}_*"))
    assert not leaked, f"shared-memory segments outlived the run: {leaked}"


@pytest.mark.usefixtures("shm_op")
def test_hostfile_pdsh_two_nodes(ssh_cluster: SshCluster, data: dict[str, str], tmp_path: Path) -> None:
    workdir = _workdir(tmp_path / "work")
    hosts = ssh_cluster.write_hostfile(workdir / "hosts")
    port = free_port()
    run_dir = tmp_path / "run"
    command = [
        *_hostfile_command(hosts, port, "--venv_script", str(VENV / "bin/activate")), *_script_args(data, run_dir),
    ]
    result = _launch(ssh_cluster, command, workdir)
    _assert_trained(result, run_dir, port)


@pytest.mark.usefixtures("shm_op")
def test_hostfile_mpich_launcher(ssh_cluster: SshCluster, data: dict[str, str], tmp_path: Path) -> None:
    workdir = _workdir(tmp_path / "work")
    hosts = ssh_cluster.write_hostfile(workdir / "hosts")
    port = free_port()
    run_dir = tmp_path / "run"
    # hydra's proxies call back on loopback (-iface lo), whatever this host's name resolves to.
    options = ["--launcher", "mpich", "--launcher_args=-iface lo"]
    result = _launch(ssh_cluster, [*_hostfile_command(hosts, port, *options), *_script_args(data, run_dir)], workdir)
    _assert_trained(result, run_dir, port)


@pytest.mark.usefixtures("shm_op")
def test_hostfile_no_ssh_node_rank_under_srun(
    slurm_cluster: SlurmCluster, data: dict[str, str], tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    port = free_port()
    run_dir = tmp_path / "run"
    runner = shlex.join(_hostfile_command(Path("hosts"), port, "--no_ssh"))
    exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in RANK_ENV.items())
    # One task per node; each starts its node's 2 ranks as line $SLURM_NODEID of the hostfile.
    task = _executable(
        workdir / "task.sh", f'exec {runner} --node_rank="$SLURM_NODEID" {shlex.join(_script_args(data, run_dir))}\n'
    )
    script = _executable(
        workdir / "job.sh",
        f"set -eu\nsource {shlex.quote(str(VENV / 'bin/activate'))}\nexport {exports}\n"
        # The allocation's hosts in SLURM's order (launchers/hosts.example's recipe): node1, node2.
        """scontrol show hostnames "$SLURM_JOB_NODELIST" | sed 's/$/ slots=2/' > hosts\n"""
        f"srun -N2 -n2 --kill-on-bad-exit=1 {task}\n",
    )
    output = tmp_path / "job.out"
    options = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={output}", "--time=5"]
    job = slurm_cluster.sbatch(script, sbatch_options=options, cwd=workdir)
    state = slurm_cluster.wait(job, timeout=LAUNCH_TIMEOUT)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", (state, log[-5000:], slurm_cluster.log_tails())
    assert (workdir / "hosts").read_text() == "node1 slots=2\nnode2 slots=2\n"
    _assert_trained(subprocess.CompletedProcess([], 0, log, ""), run_dir, port)


@pytest.mark.usefixtures("shm_op")
def test_hostfile_checkpoint_dir_not_shared(ssh_cluster: SshCluster, data: dict[str, str], tmp_path: Path) -> None:
    workdir = _workdir(tmp_path / "work")
    hosts = ssh_cluster.write_hostfile(workdir / "hosts")
    local = ssh_cluster.node_local[0]  # each node sees its own private dir here
    run_dir = tmp_path / "run"
    command = [
        *_hostfile_command(hosts, free_port(), "--venv_script", str(VENV / "bin/activate")),
        *_script_args(data, run_dir, checkpoint__dir=str(local / "checkpoints")),
    ]
    result = _launch(ssh_cluster, command, workdir)
    output = result.stdout
    assert result.returncode != 0, output[-5000:]
    refusals = [line for line in output.splitlines() if "checkpoint.dir" in line and "is not shared" in line]
    assert refusals, output[-5000:]
    assert any("node2" in line for line in refusals), refusals
    for node in ssh_cluster.nodes:
        written = list(ssh_cluster.private_dir(node, local).rglob("global_step*"))
        assert not written, f"{node} wrote checkpoint tags in its private checkpoint.dir: {written}"
    assert not list(local.rglob("global_step*"))


def test_hostfile_example_is_a_valid_hostfile() -> None:
    from deepspeed.launcher.runner import fetch_hostfile

    assert fetch_hostfile(str(ROOT / "launchers/hosts.example")) == {"node1": 8, "node2": 8}
