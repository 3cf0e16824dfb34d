"""Every parallel layout computes what one process computes: eight layouts, 20 steps each, through
the real `deepspeed` launcher and `launchers/pretrain.py`, each from one command line of overrides.

All runs see the same global batches (``data.global_batches=true``: each data-parallel rank keeps
its rows of the global micro-batch) and the same contrastive batch per micro-step (8 pairs:
``micro_batch_size`` x data-parallel size), with two micro-batches of gradient accumulation, so
the pipeline runs two micro-batches in flight. Their ``train/loss`` in TensorBoard must agree
with the single process to 1e-4 relative at every step. A PP=2 run resumed from its step-10
checkpoint must continue with the uninterrupted run's losses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.launch import deepspeed_command, overrides, run, tensorboard_events

STEPS = 20
CONTRASTIVE_BATCH = 8
RTOL = 1e-4

# name: (ranks, data-parallel size, overrides)
LAYOUTS: dict[str, tuple[int, int, dict[str, str]]] = {
    "one process": (1, 1, {}),
    "DP=2": (2, 2, {"parallel.zero_stage": "0"}),
    "DP=2 ZeRO-3": (2, 2, {"parallel.zero_stage": "3"}),
    "TP=2": (2, 1, {"parallel.tensor_parallel": "2"}),
    "TP=2 x DP=2 ZeRO-3": (4, 2, {"parallel.tensor_parallel": "2", "parallel.zero_stage": "3"}),
    "PP=2": (2, 1, {"parallel.pipeline_parallel": "2", "parallel.zero_stage": "1"}),
    "TP=2 x PP=2": (4, 1, {"parallel.tensor_parallel": "2", "parallel.pipeline_parallel": "2", "parallel.zero_stage": "1"}),
    # Beyond the seven: all three at once (the loss the pipeline logs is averaged over data-parallel
    # ranks), with a user-given split.
    "TP=2 x PP=2 x DP=2, split 3,6": (
        8, 2, {"parallel.tensor_parallel": "2", "parallel.pipeline_parallel": "2", "parallel.zero_stage": "1",
               "parallel.pipeline_partition": "3,6"},
    ),
}


def _command(data: dict[str, str], run_dir: Path, ranks: int, dp: int, changes: dict[str, str], *options: str) -> list[str]:
    values = {
        "micro_batch_size": str(CONTRASTIVE_BATCH // dp),
        "grad_accum_steps": "2",
        "train_steps": str(STEPS),
        "optim.warmup_steps": "5",
        "logging.log_interval": "1",
        "checkpoint.save_interval": "10",
        "data.global_batches": "true",
        **changes,
    }
    args = ["--config", "clip_tiny", *options, *overrides(data, run_dir, **{k.replace(".", "__"): v for k, v in values.items()})]
    return deepspeed_command(ranks, args)


def _losses(run_dir: Path) -> dict[int, float]:
    events = tensorboard_events(run_dir / "tensorboard", "train/loss")
    return {step: values[-1] for step, values in events.items()}


@pytest.fixture(scope="module")
def runs(data: dict[str, str], tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    dirs = {}
    for index, (name, (ranks, dp, changes)) in enumerate(LAYOUTS.items()):
        run_dir = root / f"layout{index}"
        result = run(_command(data, run_dir, ranks, dp, changes), root / f"layout{index}.log")
        assert result.returncode == 0, f"{name}:\n{result.stdout[-4000:]}"
        if "parallel.pipeline_partition" in changes:
            assert "pipeline: 2 stages of layers 0-2, 3-8 (parallel.pipeline_partition=3,6)" in result.stdout
        dirs[name] = run_dir
    return dirs


def test_every_layout_trains_to_the_losses_of_one_process(runs: dict[str, Path]) -> None:
    reference = _losses(runs["one process"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1]  # it learns
    worst = {}
    for name, run_dir in runs.items():
        losses = _losses(run_dir)
        assert sorted(losses) == sorted(reference), name
        worst[name] = max(abs(losses[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert all(value <= RTOL for value in worst.values()), worst


def test_pipeline_resume_continues_the_uninterrupted_run(data: dict[str, str], runs: dict[str, Path], tmp_path: Path) -> None:
    """PP=2 from its step-10 checkpoint (copied into a fresh run directory) gives steps 11-20 of the
    uninterrupted PP=2 run."""
    ranks, dp, changes = LAYOUTS["PP=2"]
    uninterrupted = runs["PP=2"]
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoints" / "global_step10", resumed / "checkpoints" / "global_step10")
    result = run(_command(data, resumed, ranks, dp, changes, "--resume", "auto"), tmp_path / "resume.log")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "resumed from" in result.stdout
    before, after = _losses(uninterrupted), _losses(resumed)
    assert sorted(after) == list(range(11, STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=0), step
