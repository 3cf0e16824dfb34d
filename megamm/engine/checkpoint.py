"""Checkpoints: DeepSpeed's save/load plus a completion marker, discovery and retention.

A checkpoint is a DeepSpeed tag directory ``<dir>/global_step<N>``. It counts as complete
only once every rank has finished writing and rank 0 has written ``megamm_complete.json``
into it (atomically). Resume picks the newest complete one, so a save cut short by a crash
or preemption is never loaded; older complete checkpoints are deleted only after a newer one
is complete. A run resumed from an older step (a rollback) first moves the tags above it, the
abandoned line, to ``<dir>/abandoned/``, so that neither resume nor pruning sees them again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from megamm.fileio import atomic_output

MARKER = "megamm_complete.json"
ABANDONED = "abandoned"
"""Subdirectory that receives the checkpoints of a line abandoned by a rollback."""
TAG_PATTERN = re.compile(r"^global_step(\d+)$")


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def _tags(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``global_step<N>`` directory under ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = TAG_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``directory``, oldest first."""
    return [(step, path) for step, path in _tags(directory) if (path / MARKER).is_file()]


def incomplete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint tag under ``directory`` without a completion marker."""
    return [(step, path) for step, path in _tags(directory) if not (path / MARKER).is_file()]


def latest_complete(directory: str | Path) -> Optional[Path]:
    """The newest complete checkpoint directory, or None."""
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    with atomic_output(path) as handle:
        handle.write(json.dumps(payload, indent=2).encode("utf-8"))


def save_checkpoint(
    engine: Any,
    directory: str | Path,
    step: int,
    client_state: dict[str, Any],
    keep_last: int,
    marker: dict[str, Any],
) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory.

    ``marker`` (the parallel layout, the run's config) goes into the completion marker with
    the step, so that a resume with another layout or model is refused by reading one small
    JSON file, before any process group starts or DeepSpeed loads mismatched shards.
    """
    directory = Path(directory)
    tag = tag_for_step(step)
    path = directory / tag
    if dist.get_rank() == 0:
        # Overwriting a tag (a run resumed from an older checkpoint): it stops being complete first.
        (path / MARKER).unlink(missing_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        _write_json_atomic(path / MARKER, {"step": step, **marker})
        _prune(directory, keep_last, path)
    dist.barrier()
    return path


def _prune(directory: Path, keep_last: int, just_written: Path) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints; never ``just_written``.

    Steps order the checkpoints as they were saved, because :func:`set_aside_abandoned` has
    moved every tag of an abandoned line out of the directory before the first save of a new one.
    """
    for _, path in complete_checkpoints(directory)[:-keep_last]:
        if path == just_written:
            continue
        # Remove the marker first: a half-deleted checkpoint must never look complete.
        (path / MARKER).unlink()
        shutil.rmtree(path, ignore_errors=True)


def set_aside_abandoned(directory: str | Path, resumed_step: int) -> list[Path]:
    """Move the tags newer than ``resumed_step`` out of ``directory``; return where they went.

    A run resumed from step S (a rollback, say after a loss spike) starts a new line of
    checkpoints: tags above S belong to the abandoned line, and ``--resume auto`` must never
    pick them again, nor may pruning count them. They are moved, intact and with their markers
    (so still loadable by path), to ``<directory>/abandoned/resumed-at-step<S>-<time>/``.
    Call it on one rank, before the new line's first save.
    """
    directory = Path(directory)
    newer = [path for step, path in _tags(directory) if step > resumed_step]
    if not newer:
        return []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = directory / ABANDONED / f"resumed-at-step{resumed_step}-{stamp}"
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in newer:
        destination = target / path.name
        os.rename(path, destination)
        moved.append(destination)
    return moved


def read_marker(path: str | Path) -> dict[str, Any]:
    """The completion marker of checkpoint ``path`` (step and parallel layout)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{path} is not a complete megamm checkpoint (no {MARKER}); pass --resume auto to pick "
            "the newest complete one"
        )
    return json.loads(marker.read_text())


def check_layout(path: str | Path, layout: dict[str, int]) -> None:
    """Raise if checkpoint ``path`` was written with other parallel sizes than ``layout``."""
    saved = read_marker(path)
    differing = {key: (saved.get(key), value) for key, value in layout.items() if saved.get(key) != value}
    if differing:
        details = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differing.items())
        raise ValueError(
            f"checkpoint {path} was written with another parallel layout ({details}); resume with "
            "the layout it was saved with (re-sharding a checkpoint is not supported yet)"
        )


def load_checkpoint(engine: Any, path: str | Path) -> dict[str, Any]:
    """Load model, optimizer and scheduler state from a complete checkpoint; return client state."""
    path = Path(path)
    read_marker(path)
    load_path, client_state = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    return client_state or {}
