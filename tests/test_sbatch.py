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

from tests.launch import ROOT, digest, overrides, tensorboard_events
from tests.slurm_cluster import SlurmCluster, slurm_cluster

__all__ = ["slurm_cluster"]  # the fixture, imported for pytest

STEPS = 12
SBATCH = ["--nodes=2", "--ntasks-per-node=2", "--time=10"]


def _submit(cluster: SlurmCluster, data: dict[str, str], run_dir: Path) -> tuple[int, Path]:
    output = run_dir.with_suffix(".out")
    args = ["--config", "clip_tiny", *overrides(
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


def test_sbatch_finetune_entry_starts_from_the_pretrain_weights_on_separate_shards(
    slurm_cluster: SlurmCluster, data: dict[str, str], reference: Path, tmp_path: Path
) -> None:
    """MEGAMM_ENTRY=launchers/finetune.py: weights only from the 2x2 pretrain checkpoint, at another
    data-parallel size (1 node x 2 tasks: TP=2 x DP=1), on the user's own shards, with its own LR
    and steps, a fresh optimizer and schedule, evaluated on held-out shards."""
    from megamm.data import write_demo_dataset

    own = tmp_path / "own_data"
    write_demo_dataset(own, train_shards=2, samples_per_shard=32, eval_samples=40, image_size=32, seed=7)
    before = digest(reference / "checkpoints")
    run_dir = tmp_path / "finetune"
    output = run_dir.with_suffix(".out")
    lr, warmup, steps = 3e-4, 4, 4
    args = [
        "--from", str(reference / "checkpoints"),
        "--data_path", str(own / "train"),
        "--eval_path", data["data.eval_shards"],  # the pretrain run's held-out shards: step 0 must score as it did
        f"optim.lr={lr}", f"optim.warmup_steps={warmup}", f"train_steps={steps}", "checkpoint.save_interval=2",
        "logging.log_interval=1", f"checkpoint.dir={run_dir / 'checkpoints'}",
        f"logging.tensorboard_dir={run_dir / 'tensorboard'}",
    ]
    job = slurm_cluster.sbatch(
        ROOT / "launchers/run.sh", *args, sbatch_options=["--nodes=1", "--ntasks-per-node=2", "--time=10", f"--output={output}"],
        cwd=ROOT, env_extra={"MEGAMM_ENTRY": "launchers/finetune.py"},
    )
    state = slurm_cluster.wait(job, timeout=400)
    log = output.read_text() if output.exists() else ""
    assert state == "COMPLETED", (state, log[-4000:], slurm_cluster.log_tails())
    assert "launchers/finetune.py" in log and "2 ranks: tp=2 dp=1 zero=3" in log
    assert f"weights from {reference / 'checkpoints' / f'global_step{STEPS}'}" in log
    assert "training source train_shards: 2 shards, 64 samples" in log

    tensorboard = run_dir / "tensorboard"
    pretrained = tensorboard_events(reference / "tensorboard", "eval/text_to_image_R@1")[STEPS]
    assert tensorboard_events(tensorboard, "eval/text_to_image_R@1")[0] == pretrained  # the same weights
    assert tensorboard_events(tensorboard, "eval/image_to_text_R@1")[0] == tensorboard_events(
        reference / "tensorboard", "eval/image_to_text_R@1"
    )[STEPS]
    assert sorted(tensorboard_events(tensorboard, "train/loss")) == list(range(1, steps + 1))  # a fresh step counter
    lrs = tensorboard_events(tensorboard, "train/lr")
    # A fresh warmup to its own LR (logged after each step: the next step's LR, (step + 1) / warmup of it).
    assert lrs[1] == pytest.approx([lr * 2 / warmup]) and lrs[3] == pytest.approx([lr])
    assert (run_dir / "checkpoints" / f"global_step{steps}" / "megamm_complete.json").is_file()
    assert digest(reference / "checkpoints") == before, "fine-tuning wrote into the source run's checkpoints"
