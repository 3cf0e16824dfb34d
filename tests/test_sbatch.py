"""`sbatch launchers/run.sh` on a 2-node SLURM cluster on loopback (tests/slurm_cluster.py).

2 nodes x 2 tasks, TP=2 x DP=2 under ZeRO-3. A reference job runs uninterrupted; a second job
is preempted the way `#SBATCH --signal=B:USR1@T` does it (SIGUSR1 to the batch shell), must
checkpoint, requeue itself and resume, and must end with the reference's losses and weights.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from tests.launch import ROOT, overrides, tensorboard_events
from tests.slurm_cluster import SlurmCluster, slurm_cluster

__all__ = ["slurm_cluster"]  # the fixture, imported for pytest

STEPS = 12
SBATCH = ["--nodes=2", "--ntasks-per-node=2", "--time=10"]


def _submit(cluster: SlurmCluster, data: dict[str, str], run_dir: Path) -> tuple[int, Path]:
    output = run_dir.with_suffix(".out")
    args = ["--config", "tiny", *overrides(
        data, run_dir, train_steps=str(STEPS), parallel__tensor_parallel="2", checkpoint__save_interval="100",
        logging__log_interval="1",
    )]
    job = cluster.sbatch(ROOT / "launchers/run.sh", *args, sbatch_options=[*SBATCH, f"--output={output}"], cwd=ROOT)
    return job, output


def _fp32_weights(checkpoint: Path) -> dict[str, list[torch.Tensor]]:
    """Each shard file's fp32 master weights (ZeRO-3 partitions), without the partitions' padding.

    ZeRO-3 splits every parameter into ``ceil(numel / dp)`` elements per rank; the last ranks'
    tails are padding, which holds no weight (and no defined value).
    """
    weights = {}
    for path in sorted(checkpoint.glob("zero_pp_rank_*_optim_states.pt")):
        rank = int(path.name.split("_")[3])
        model = torch.load(str(path).replace("optim_states", "model_states"), map_location="cpu", weights_only=False)
        groups = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]
        dp = model["dp_world_size"]
        kept = []
        for flat, shapes in zip(groups, model["param_shapes"]):
            pieces, offset = [], 0
            for shape in shapes.values():
                numel = shape.numel()
                chunk = -(-numel // dp)
                real = max(0, min(chunk, numel - rank * chunk))
                pieces.append(flat[offset : offset + real])
                offset += chunk
            assert offset == flat.numel(), "unexpected ZeRO-3 partition layout"
            kept.append(torch.cat(pieces))
        weights[path.name] = kept
    return weights


@pytest.fixture(scope="module")
def reference(slurm_cluster: SlurmCluster, data: dict[str, str], tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sbatch") / "reference"
    job, output = _submit(slurm_cluster, data, run_dir)
    state = slurm_cluster.wait(job, timeout=400)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", (state, log[-4000:], slurm_cluster.log_tails())
    return run_dir


def test_sbatch_run_sh_trains_on_two_nodes(reference: Path) -> None:
    log = reference.with_suffix(".out").read_text()
    assert "4 ranks: tp=2 dp=2 zero=3" in log
    assert "hosts: node1 (ranks 0, 1), node2 (ranks 2, 3)" in log
    assert "text->image R@1" in log
    assert sorted(tensorboard_events(reference / "tensorboard", "train/loss")) == list(range(1, STEPS + 1))


def test_sbatch_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, data: dict[str, str], reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "preempted"
    job, output = _submit(slurm_cluster, data, run_dir)
    deadline = time.monotonic() + 300
    while not (output.exists() and re.search(r"step [3-9]/12", output.read_text())):
        assert time.monotonic() < deadline, (output.read_text() if output.exists() else "", slurm_cluster.log_tails())
        time.sleep(0.2)
    slurm_cluster.scancel(job, "--batch", "--signal=USR1")  # what --signal=B:USR1@T does
    state = slurm_cluster.wait(job, timeout=400)
    log = output.read_text()
    assert state == "COMPLETED" and state.restarts == 1, (state, log[-4000:])
    match = re.search(r"preempted: stopped by SIGUSR1 after step (\d+)", log)
    assert match, log[-4000:]
    step = int(match.group(1))
    assert 3 <= step < STEPS
    assert "run.sh: preempted" in log and "requeueing job" in log
    assert re.search(rf"resumed from \S+global_step{step} at step {step}", log), log[-4000:]

    losses = tensorboard_events(run_dir / "tensorboard", "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in losses.values()), losses
    assert losses == tensorboard_events(reference / "tensorboard", "train/loss")
    final = f"checkpoints/global_step{STEPS}"
    ours, theirs = _fp32_weights(run_dir / final), _fp32_weights(reference / final)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for name in ours:
        for mine, other in zip(ours[name], theirs[name]):
            assert torch.equal(mine, other), f"{name}: the resumed run's weights differ"
