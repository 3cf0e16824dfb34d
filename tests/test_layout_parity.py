"""Every parallel layout computes what one process computes: seven layouts (tests/layout_runs.py),
6 steps each, through the real `deepspeed` launcher and `launchers/pretrain.py`, each from one
command line of overrides.

All runs see the same global batches and the same contrastive batch per micro-step, with two
micro-batches of gradient accumulation, so the pipeline runs two micro-batches in flight. Their
``train/loss`` in TensorBoard must agree with the single process to 1e-4 relative at every step.
A PP=2 run resumed from its step-3 checkpoint must continue with the uninterrupted run's losses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.layout_runs import LAYOUTS, SAVED, STEPS, layout_run, losses, train

RTOL = 1e-4


@pytest.fixture(scope="module")
def runs(data: dict[str, str], tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for name in LAYOUTS:
        dirs[name], output = layout_run(name, data, tmp_path_factory)
        if "parallel.pipeline_partition" in LAYOUTS[name][2]:
            assert "pipeline: 2 stages of layers 0-2, 3-8 (parallel.pipeline_partition=3,6)" in output
    return dirs


def test_every_layout_trains_to_the_losses_of_one_process(runs: dict[str, Path]) -> None:
    reference = losses(runs["one process"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1]  # it learns
    worst = {}
    for name, run_dir in runs.items():
        ours = losses(run_dir)
        assert sorted(ours) == sorted(reference), name
        worst[name] = max(abs(ours[s] - reference[s]) / abs(reference[s]) for s in reference)
    assert all(value <= RTOL for value in worst.values()), worst


def test_pipeline_resume_continues_the_uninterrupted_run(data: dict[str, str], runs: dict[str, Path], tmp_path: Path) -> None:
    """PP=2 from its step-3 checkpoint (copied into a fresh run directory) gives steps 4-6 of the
    uninterrupted PP=2 run."""
    ranks, dp, changes = LAYOUTS["PP=2"]
    uninterrupted = runs["PP=2"]
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoints" / f"global_step{SAVED}", resumed / "checkpoints" / f"global_step{SAVED}")
    output = train(data, resumed, ranks, dp, changes, "--resume", "auto")
    assert "resumed from" in output
    before, after = losses(uninterrupted), losses(resumed)
    assert sorted(after) == list(range(SAVED + 1, STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=0), step
