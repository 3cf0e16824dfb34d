"""Checkpoint discovery and retention on the file system (DeepSpeed's save/load is covered end to end)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megamm.config import ConfigError
from megamm.engine.checkpoint import MARKER, _prune, check_layout, complete_checkpoints, latest_complete
from megamm.preflight import resolve_resume


def _checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"global_step{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        (path / MARKER).write_text("{}")
    return path


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 30)
    _checkpoint(tmp_path, 40, complete=False)  # a save cut short by preemption
    (tmp_path / "latest").write_text("global_step40")
    (tmp_path / "global_stepX").mkdir()
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [10, 30]
    assert latest_complete(tmp_path) == tmp_path / "global_step30"
    assert latest_complete(tmp_path / "missing") is None


def test_prune_keeps_newest_complete_and_never_touches_incomplete(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    partial = _checkpoint(tmp_path, 40, complete=False)
    _prune(tmp_path, keep_last=2, just_written=tmp_path / "global_step30")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step20", "global_step30", "global_step40"]
    assert (partial / "mp_rank_00_model_states.pt").read_bytes() == b"weights"


def test_resolve_resume(tmp_path: Path) -> None:
    assert resolve_resume("auto", str(tmp_path)) is None
    assert resolve_resume("none", str(tmp_path)) is None
    newest = _checkpoint(tmp_path, 20)
    assert resolve_resume("auto", str(tmp_path)) == newest
    assert resolve_resume(str(newest), str(tmp_path)) == newest
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        resolve_resume("none", str(tmp_path))
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path))


def test_resume_with_another_parallel_layout_is_refused(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, 10, complete=False)
    (path / MARKER).write_text(json.dumps({"step": 10, "world_size": 4, "tensor_parallel": 2, "data_parallel": 2}))
    check_layout(path, {"world_size": 4, "tensor_parallel": 2, "data_parallel": 2})
    with pytest.raises(ValueError, match="tensor_parallel 2 -> 1, data_parallel 2 -> 4"):
        check_layout(path, {"world_size": 4, "tensor_parallel": 1, "data_parallel": 4})
    with pytest.raises(FileNotFoundError, match="not a complete megamm checkpoint"):
        check_layout(_checkpoint(tmp_path, 20, complete=False), {"world_size": 1})
