"""`launchers/pretrain.py` runs unchanged under `mpiexec` (MPICH from the `mpich` wheel; ranks and
rendezvous from mpi4py) and `torchrun`, and trains exactly as under the `deepspeed` launcher.

TP=2 x DP=2 under ZeRO-3 on one host, loopback only: every launcher gets 127.0.0.1 explicitly. The
`deepspeed` run is tests/layout_runs.py's "TP=2 x DP=2 ZeRO-3" layout (shared with the layout
tests); the other launchers run it with the same arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megamm.engine import free_port
from tests.launch import PRETRAIN, run, tensorboard_events
from tests.layout_runs import LAYOUTS, STEPS, layout_args, layout_run

LAYOUT = "TP=2 x DP=2 ZeRO-3"
RANKS = 4


def _args(data: dict[str, str], run_dir: Path) -> list[str]:
    ranks, dp, changes = LAYOUTS[LAYOUT]
    assert ranks == RANKS
    return layout_args(data, run_dir, dp, changes)


def _check(run_dir: Path, output: str, reference: Path) -> None:
    assert f"{RANKS} ranks: tp=2 dp=2 zero=3" in output, output[-3000:]
    assert "text->image R@1" in output
    losses = tensorboard_events(run_dir / "tensorboard", "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == tensorboard_events(reference / "tensorboard", "train/loss"), "another launcher, other numbers"
    assert (run_dir / "checkpoints" / f"global_step{STEPS}" / "megamm_complete.json").is_file()


@pytest.fixture(scope="module")
def reference(data: dict[str, str], tmp_path_factory) -> Path:
    """The same run under the `deepspeed` launcher."""
    return layout_run(LAYOUT, data, tmp_path_factory)[0]


def test_mpiexec_n4_trains_like_the_deepspeed_launcher(data: dict[str, str], reference: Path, tmp_path: Path) -> None:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    assert mpiexec.is_file(), "the mpich wheel provides mpiexec: pip install -e '.[dev]'"
    run_dir = tmp_path / "mpiexec"
    # MPI announces ranks only (PMI_RANK, PMI_SIZE); megamm maps them and picks a free port on
    # rank 0. -iface lo keeps MPICH's own traffic on loopback too.
    command = [str(mpiexec), "-n", str(RANKS), "-iface", "lo", "-genv", "MASTER_ADDR", "127.0.0.1",
               sys.executable, PRETRAIN, *_args(data, run_dir)]
    result = run(command, tmp_path / "mpiexec.log", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    _check(run_dir, result.stdout, reference)


def test_torchrun_trains_like_the_deepspeed_launcher(data: dict[str, str], reference: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    run_dir = tmp_path / "torchrun"
    command = [str(torchrun), "--nnodes", "1", "--nproc_per_node", str(RANKS), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), PRETRAIN, *_args(data, run_dir)]
    result = run(command, tmp_path / "torchrun.log", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    _check(run_dir, result.stdout, reference)
