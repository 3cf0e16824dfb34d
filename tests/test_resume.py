"""Resume semantics through `launchers/pretrain.py`: rollbacks, the data position, the skip count.

Each test failed on the skeleton; its docstring says how.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.launch import deepspeed_command, digest, overrides, pretrain, run, write_bad_shard


def _train(data: dict[str, str], run_dir: Path, *options: str, **changes: str) -> str:
    result = pretrain(["--config", "clip_tiny", *options, *overrides(data, run_dir, **changes)])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def _tags(run_dir: Path) -> list[str]:
    return sorted((p.name for p in (run_dir / "checkpoints").glob("global_step*")), key=lambda name: int(name[11:]))


def _train_state(checkpoint: Path) -> dict:
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return states["train_state"]


# ----------------------------------------------------------------------------------------------
# Rollback


@pytest.fixture(scope="module")
def line_a(data: dict[str, str], tmp_path_factory) -> Path:
    """Run A, which saved steps 2, 4 and 6 (keep_last=3); each rollback test resumes a copy of it."""
    run_dir = tmp_path_factory.mktemp("line-a") / "run"
    _train(data, run_dir, train_steps="6", checkpoint__keep_last="3")
    assert _tags(run_dir) == ["global_step2", "global_step4", "global_step6"]
    return run_dir


def _roll_back(data: dict[str, str], line_a: Path, run_dir: Path, keep_last: str) -> str:
    """Run B, in a copy of run A: resumes from step 2 and saves step 4."""
    shutil.copytree(line_a, run_dir)
    return _train(
        data, run_dir, "--resume", str(run_dir / "checkpoints" / "global_step2"), train_steps="4",
        checkpoint__keep_last=keep_last,
    )


def test_rollback_sets_the_abandoned_line_aside(data: dict[str, str], line_a: Path, tmp_path: Path) -> None:
    """Skeleton: pruning deleted global_step2 (B's starting point) and kept A's global_step6, which
    the next --resume auto picked."""
    run_dir = tmp_path / "run"
    abandoned_before = digest(line_a / "checkpoints" / "global_step4", line_a / "checkpoints" / "global_step6")
    log = _roll_back(data, line_a, run_dir, keep_last="2")
    assert _tags(run_dir) == ["global_step2", "global_step4"]
    assert "so the later checkpoints in checkpoint.dir (global_step4, global_step6) belong to an abandoned line" in log
    (moved,) = (run_dir / "checkpoints" / "abandoned").glob("resumed-at-step2-*")
    moved_state = digest(moved / "global_step4", moved / "global_step6")
    assert list(moved_state.values()) == list(abandoned_before.values()), "the abandoned line was not kept intact"

    resumed = _train(data, run_dir, train_steps="4")
    assert f"resumed from {run_dir / 'checkpoints' / 'global_step4'} at step 4" in resumed


def test_rollback_with_keep_last_1_keeps_the_new_checkpoint(data: dict[str, str], line_a: Path, tmp_path: Path) -> None:
    """Skeleton: with keep_last=1 B's new global_step4 itself was deleted (A's step 6 was newer)."""
    run_dir = tmp_path / "run"
    _roll_back(data, line_a, run_dir, keep_last="1")
    assert _tags(run_dir) == ["global_step4"]
    assert _train_state(run_dir / "checkpoints" / "global_step4")["step"] == 4


# ----------------------------------------------------------------------------------------------
# The data position


def test_resume_with_another_micro_batch_size_continues_the_samples(data: dict[str, str], tmp_path: Path) -> None:
    """Skeleton: the position was 3 batches; resumed at micro-batch 8 it skipped samples 12-23.

    Now it is the stream's state (12 samples into its first shuffle block), saved in the
    checkpoint, and the resumed run continues there.
    """
    run_dir = tmp_path / "run"
    _train(data, run_dir, micro_batch_size="4", train_steps="3", checkpoint__save_interval="3")
    state = _train_state(run_dir / "checkpoints" / "global_step3")
    assert state["batches_consumed"] == 3 and list(state["data_position"]) == [0]
    assert (state["data_position"][0]["block"], state["data_position"][0]["offset"]) == (0, 12)
    log = _train(data, run_dir, micro_batch_size="8", train_steps="5", checkpoint__save_interval="5")
    assert "micro_batch_size 4 -> 8" in log
    after = _train_state(run_dir / "checkpoints" / "global_step5")["data_position"][0]
    assert (after["block"], after["offset"]) == (0, 12 + 2 * 8)


def test_resume_with_other_streams_restarts_at_the_next_epoch_and_other_data_is_refused(
    data: dict[str, str], tmp_path: Path
) -> None:
    """Skeleton: a new data.num_workers (or seed, shuffle buffer, shards) remapped every stream
    and silently replayed or skipped data. Now another number of streams (data-parallel ranks x
    loader workers) restarts each source at its next epoch and says so; any other change to what
    the streams read is refused unless --restart-data."""
    run_dir = tmp_path / "run"
    _train(data, run_dir, train_steps="2")
    before = digest(run_dir)
    refused = pretrain(["--config", "clip_tiny", *overrides(data, run_dir, train_steps="4", data__seed="9")])
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "saved reading another training data stream (data.seed changed: seed 1234 -> 9)" in refused.stderr
    assert "--restart-data" in refused.stderr and digest(run_dir) == before

    log = _train(data, run_dir, train_steps="4", data__num_workers="2")
    assert "the training data is read by 2 streams now" in log and "not 1 as when global_step2 was saved" in log
    assert "each source restarts at the next epoch boundary (train_shards: epoch 1)" in log
    position = _train_state(run_dir / "checkpoints" / "global_step4")["data_position"]
    assert sorted(position) == [0, 1] and [state["sources"][0]["epoch"] for state in position.values()] == [1, 1]

    log = _train(data, run_dir, "--restart-data", train_steps="6", data__num_workers="2", data__seed="9")
    assert "the training data starts again from its beginning (as --restart-data asks)" in log
    position = _train_state(run_dir / "checkpoints" / "global_step6")["data_position"]
    assert [state["sources"][0]["epoch"] for state in position.values()] == [0, 0]


# ----------------------------------------------------------------------------------------------
# The skip count under ZeRO stages 0-2


def _skipped(tensorboard: Path) -> dict[int, float]:
    accumulator = EventAccumulator(str(tensorboard))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars("train/samples_skipped")}


def test_samples_skipped_survives_resume_under_zero_1(data: dict[str, str], tmp_path: Path) -> None:
    """Skeleton: under ZeRO 0-2 DeepSpeed saves DP rank 0's client state only, so after a resume
    every rank restarted from rank 0's count and the logged total was wrong.

    Here only data-parallel rank 0 reads a shard with bad samples (7 per pass over its shards).
    """
    shards = tmp_path / "train"
    shutil.copytree(data["data.train_shards"], shards)
    write_bad_shard(shards / "shard-000004.tar", 7)  # shards[0::2] -> rank 0: 000000, 000002 and this one
    common = dict(data__train_shards=str(shards), parallel__zero_stage="1", logging__log_interval="1",
                  train_steps="12", checkpoint__save_interval="6", checkpoint__keep_last="3")
    args = ["--config", "clip_tiny", "--ds-config", "ds_configs/zero1.json"]
    full = run(deepspeed_command(2, [*args, *overrides(data, tmp_path / "full", **common)]), tmp_path / "full.log")
    assert full.returncode == 0, full.stdout[-3000:]
    uninterrupted = _skipped(tmp_path / "full" / "tensorboard")
    assert uninterrupted[12] >= 7, "rank 1 never met its bad samples"

    rollback = [*args, "--resume", str(tmp_path / "full" / "checkpoints" / "global_step6")]
    resumed_dir = dict(common, logging__tensorboard_dir=str(tmp_path / "resumed"))
    resumed = run(deepspeed_command(2, [*rollback, *overrides(data, tmp_path / "full", **resumed_dir)]),
                  tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert re.search(r"resumed from .*global_step6 at step 6", resumed.stdout)
    after = _skipped(tmp_path / "resumed")
    assert {step: after[step] for step in range(7, 13)} == {step: uninterrupted[step] for step in range(7, 13)}
