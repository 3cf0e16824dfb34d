"""Checkpoints: DeepSpeed's save/load plus a completion marker, discovery and retention.

A checkpoint is a DeepSpeed tag directory ``<dir>/global_step<N>``. It counts as complete
only once every rank has finished writing and rank 0 has written ``megamm_complete.json``
into it (atomically). Resume picks the newest complete one, so a save cut short by a crash
or preemption is never loaded; older complete checkpoints are deleted only after a newer one
is complete. A run resumed from an older step (a rollback) first moves the tags above it, the
abandoned line, to ``<dir>/abandoned/``, so that neither resume nor pruning sees them again.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megamm.config import ConfigError
from megamm.fileio import atomic_output, fsync_path

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


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (a full disk, say); the partial tag is gone, older ones intact."""


class _WriteErrors:
    """Makes DeepSpeed's checkpoint writes durable, and collects the first error on this rank
    instead of raising it.

    Every file is fsynced once written (``torch.save`` does not), so that the completion marker,
    written after every rank's files, never reaches the disk before the data it vouches for: a
    power loss right after a save must not leave a "complete" checkpoint of empty shards.
    DeepSpeed's save runs collectives between its file writes; a rank that raised out of it
    would leave its peers waiting in them. Inside :meth:`collecting`, a failed write is
    recorded, its partial file removed, and the save goes on, so every rank reaches the end
    and the ranks can agree that the tag failed.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.error: Optional[Exception] = None
        self.free_bytes: Optional[int] = None
        """Free space where the failed write went, measured before its partial file was removed."""

    def _guard(self, write: Any, describe: Any) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.error is not None:
                return None  # the tag has failed already: write nothing more
            target = describe(*args, **kwargs)
            try:
                result = write(*args, **kwargs)
                if target:
                    fsync_path(Path(target))
                return result
            except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
                self.error = error
                self.free_bytes = _free_bytes(Path(target).parent if target else Path("."))
                if target:
                    Path(target).unlink(missing_ok=True)
                return None

        return guarded

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        store = self.engine.checkpoint_engine
        saved = store.save, self.engine._copy_recovery_script
        store.save = self._guard(store.save, lambda state_dict=None, path=None: path)
        self.engine._copy_recovery_script = self._guard(self.engine._copy_recovery_script, lambda *a, **k: None)
        try:
            yield
        finally:
            store.save, self.engine._copy_recovery_script = saved


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
    JSON file, before any process group starts or DeepSpeed loads mismatched shards. The
    directory's ``latest`` file names the newest complete tag (for DeepSpeed's tools).

    Raises:
        CheckpointSaveError: a write failed on some rank (a full disk, say). Every rank raises
            it; the partial tag has been removed and the older checkpoints are intact.
    """
    directory = Path(directory)
    tag = tag_for_step(step)
    path = directory / tag
    if dist.get_rank() == 0:
        # Overwriting a tag (a run resumed from an older checkpoint): it stops being complete first.
        (path / MARKER).unlink(missing_ok=True)
    dist.barrier()
    writes = _WriteErrors(engine)
    with writes.collecting():
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    # DeepSpeed's save ends in a barrier: every rank's shards are on disk, or failed.
    if dist.get_rank() == 0 and writes.error is None:
        try:
            fsync_path(path)  # the shards' directory entries, before the marker vouches for them
            _write_json_atomic(path / MARKER, {"step": step, **marker})
            fsync_path(path)  # the marker's own entry
            with atomic_output(directory / "latest") as handle:
                handle.write(tag.encode("utf-8"))
            fsync_path(directory)
        except OSError as failure:
            writes.error, writes.free_bytes = failure, _free_bytes(directory)
            (path / MARKER).unlink(missing_ok=True)
    failures = _gather_failures(writes)
    if failures:
        if dist.get_rank() == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        raise CheckpointSaveError(_save_failure_message(path, failures))
    if dist.get_rank() == 0:
        _prune(directory, keep_last, path)
    dist.barrier()
    return path


def _free_bytes(directory: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


# Less free space than this where a write failed means the filesystem filled up.
_FULL_BELOW_BYTES = 16 * 2**20


def _gather_failures(writes: _WriteErrors) -> list[tuple[str, bool]]:
    """("rank R on HOST: <error>", filesystem full?) for every rank whose writes failed (collective)."""
    mine = None
    if writes.error is not None:
        error, free = writes.error, writes.free_bytes
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < _FULL_BELOW_BYTES)
        where = "" if free is None else f", {free / 2**20:.1f} MiB free there"
        mine = (f"rank {dist.get_rank()} on {socket.gethostname()}: {type(error).__name__}: {text}{where}", full)
    every: list[Optional[tuple[str, bool]]] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [failure for failure in every if failure is not None]


def _save_failure_message(path: Path, failures: list[tuple[str, bool]]) -> str:
    previous = latest_complete(path.parent)
    kept = (
        f"the previous checkpoint {previous.name} is intact, and --resume auto resumes from it"
        if previous is not None
        else "there is no earlier complete checkpoint"
    )
    fix = (
        f"The filesystem of {path.parent} is full: free space there (a checkpoint needs about as much as the "
        "last one), or lower checkpoint.keep_last, then rerun with --resume auto"
        if any(full for _, full in failures)
        else f"Check that {path.parent} is writable from every node, then rerun with --resume auto"
    )
    texts = [text for text, _ in failures]
    return (
        f"saving checkpoint {path.name} failed ({'; '.join(texts[:4])}{'; ...' if len(texts) > 4 else ''}). "
        f"Its partial files were removed and {kept}. {fix}"
    )


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
    saved = {"pipeline_parallel": 1, **read_marker(path)}  # markers from before pipelines have no such key
    differing = {key: (saved.get(key), value) for key, value in layout.items() if saved.get(key) != value}
    if differing:
        details = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differing.items())
        stages = layout.get("pipeline_parallel", saved["pipeline_parallel"])
        to = "" if (saved["pipeline_parallel"] > 1) == (stages > 1) else f" --to {'pipeline' if stages > 1 else 'plain'}"
        raise ValueError(
            f"checkpoint {path} was written with another parallel layout ({details}); resume with "
            "the layout it was saved with, or convert it for another one: python tools/convert_checkpoint.py "
            f"{path}{to} --out <new checkpoint.dir> (DeepSpeed's universal checkpoint: any tensor-parallel, "
            "pipeline-parallel, data-parallel and ZeRO layout; --to plain or --to pipeline names the parameters "
            "for the model's form without or with pipeline stages)"
        )


def load_checkpoint(engine: Any, path: str | Path) -> dict[str, Any]:
    """Load model, optimizer and scheduler state from a complete checkpoint; return client state."""
    path = Path(path)
    universal = bool(read_marker(path).get("universal"))
    if universal:
        _check_parameter_folders(engine, path)
    groups = _hyperparameters(engine) if universal else None
    load_path, client_state = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint at {path}")
    if groups is not None:
        _repair_universal_load(engine, groups)
    return client_state or {}


def _check_parameter_folders(engine: Any, path: Path) -> None:
    """Raise unless universal checkpoint ``path`` holds a folder for each of this rank's parameters,
    by the name the engine gives it (DeepSpeed's loader would fail on the first one missing)."""
    missing = [name for name, _ in engine.module.named_parameters() if not (path / "zero" / name).is_dir()]
    if missing:
        raise RuntimeError(
            f"universal checkpoint {path} holds no zero/{missing[0]} (nor {len(missing) - 1} more of this rank's "
            "parameters): it was converted for the model's other form or another model; convert the source "
            "again with tools/convert_checkpoint.py --to plain (parallel.pipeline_parallel=1) or --to pipeline"
        )


def _repair_universal_load(engine: Any, groups: list[dict[str, Any]]) -> None:
    """Undo two slips of DeepSpeed's universal loader (0.19), which would change the trajectory.

    - It gives every parameter group the first group's settings, so norms and biases would be
      weight-decayed; the settings are the run's own (the resume check made sure they are the
      checkpoint's), so put them back.
    - Under ZeRO-3 it hands every parameter partition one and the same ``step`` tensor, which
      Adam increments in place once per partition: each partition gets its own again.
    """
    optimizer = _inner_optimizer(engine)
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _inner_optimizer(engine: Any) -> Any:
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer


def _hyperparameters(engine: Any) -> list[dict[str, Any]]:
    """Each parameter group's settings, without its parameters and its scheduled learning rate."""
    return [
        {key: value for key, value in group.items() if key not in ("params", "lr")}
        for group in _inner_optimizer(engine).param_groups
    ]


def check_shared_directory(directory: str | Path, field: str = "checkpoint.dir") -> None:
    """Refuse a ``directory`` that is not the same directory on every rank (collective).

    Rank 0 writes a probe file there; every rank must read it back. A node-local path (a
    scratch disk, /tmp) fails: rank 0 alone would write the completion markers, and a resume
    on other nodes would find no checkpoint. The probe is removed again.

    Raises:
        ConfigError: some ranks do not see rank 0's files; the message names their hosts.
    """
    if dist.get_world_size() == 1:
        return
    directory = Path(directory)
    token = [f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}" if dist.get_rank() == 0 else None]
    probe = directory / ".megamm-shared-probe"
    if dist.get_rank() == 0:
        with atomic_output(probe) as handle:
            handle.write(token[0].encode("utf-8"))
    dist.broadcast_object_list(token, src=0)
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        hosts = sorted({host for _, host in blind})
        raise ConfigError(
            f"{field} {directory} is not shared: ranks {', '.join(str(rank) for rank, _ in blind)} (on "
            f"{', '.join(hosts)}) do not see the file rank 0 (on {views[0][1]}) wrote there. Every node must "
            f"see the same {field}, on a shared filesystem (NFS, Lustre, ...): otherwise the checkpoints are "
            "incomplete and a resume cannot find them. Choose a path on a shared filesystem"
        )


def load_model_weights(path: str | Path, tp_rank: int) -> dict[str, Any]:
    """The fp32 weights of tensor-parallel rank ``tp_rank`` in checkpoint ``path``, as a state dict.

    Read from the files alone, for any data-parallel size and ZeRO stage the checkpoint was
    written with: ZeRO partitions are merged with DeepSpeed's own ``zero_to_fp32`` reader
    (pointed at this tensor-parallel rank's files only), and a stage-0 checkpoint holds the
    module whole. The keys are the model's ``state_dict()`` keys (buffers included for stage 0).
    """
    path = Path(path)
    read_marker(path)
    suffix = f"mp_rank_{tp_rank:02d}"
    whole = path / f"{suffix}_model_states.pt"
    if whole.is_file() and not list(path.glob(f"*{suffix}_optim_states.pt")):
        return dict(torch.load(whole, map_location="cpu", weights_only=False)["module"])
    files = sorted(path.glob(f"*{suffix}_model_states.pt")) + sorted(path.glob(f"*{suffix}_optim_states.pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint {path} holds no files of tensor-parallel rank {tp_rank} ({suffix})")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="megamm-weights-") as scratch:
        view = Path(scratch) / path.name  # this rank's files only: the reader merges all it finds
        view.mkdir()
        for file in files:
            (view / file.name).symlink_to(file.resolve())
        quiet = io.StringIO()  # the reader prints progress bars on every rank
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            return dict(get_fp32_state_dict_from_zero_checkpoint(scratch, tag=path.name))


def load_model_state(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """``model.load_state_dict(state)`` (strict), also for a model built partitioned under ZeRO-3.

    ``state`` holds this tensor-parallel rank's whole tensors (:func:`load_model_weights`); a module
    with an ``adapt_state_dict(state, prefix)`` method adapts its entries first (an image embedding
    trained at another resolution resizes its positions), under ZeRO-3 as without. A model
    built in :func:`~megamm.engine.model_construction` under ZeRO-3 holds empty placeholders: each
    module's own parameters are then gathered in turn (one module's at a time), filled from
    ``state`` on data-parallel rank 0, broadcast and partitioned again. Collective then: every rank
    calls it, before the engine is built (whose fp32 master copy starts from these weights).

    Raises:
        RuntimeError: keys missing from or unexpected in ``state``, or a tensor of another shape.
    """
    if not any(hasattr(param, "ds_id") for param in model.parameters()):
        model.load_state_dict(state)
        return
    import deepspeed

    state = dict(state)
    for prefix, module in model.named_modules():  # what load_state_dict's per-module hooks adapt
        if hasattr(module, "adapt_state_dict"):
            module.adapt_state_dict(state, f"{prefix}." if prefix else "")
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"the weights do not fit the model: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(list(own.values()), modifier_rank=0), torch.no_grad():
            for name, param in own.items():
                _copy_into(param, state[f"{prefix}.{name}" if prefix else name], f"{prefix}.{name}" if prefix else name)
        for name, buffer in module.named_buffers(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if key in state:
                with torch.no_grad():
                    _copy_into(buffer, state[key], key)


def _copy_into(target: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise RuntimeError(
            f"the weights do not fit the model: {key} is {tuple(value.shape)} in the checkpoint, "
            f"{tuple(target.shape)} in the model"
        )
    target.copy_(value)
