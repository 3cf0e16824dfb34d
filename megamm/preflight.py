"""Start-up checks that need no process group: every cheap file and config check a run can fail.

``run_pretraining`` calls :func:`preflight` on every rank before ``torch.distributed`` starts,
so a mistake costs seconds instead of an allocation. Preflight writes nothing: the DeepSpeed
template, the precision against the device, the tokenizer, the shards of both splits (and the
evaluation set itself), the checkpoint to resume from with its parallel layout and saved config,
and rank 0's rendezvous port. Any failure is a :class:`~megamm.config.ConfigError` naming the
field or file and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megamm.config import ConfigError, TrainConfig, to_dict
from megamm.data import (
    SIZES_FILE,
    Batch,
    Tokenizer,
    check_shard_count,
    check_shards_readable,
    expand_shards,
    iter_eval_batches,
    known_sample_count,
)
from megamm.engine import (
    MARKER,
    LaunchInfo,
    build_ds_config,
    check_layout,
    check_precision,
    incomplete_checkpoints,
    latest_complete,
    load_template,
    prepare_rendezvous,
    read_marker,
)

log = logging.getLogger("megamm")

# Fields a resumed run takes from its checkpoint: changed, they would fail to load or be ignored
# (the optimizer state restores lr, betas, eps and weight decay with the moments).
FROM_CHECKPOINT = (
    "model.",
    "precision",
    "parallel.zero_stage",
    "optim.lr",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
    "data.image_size",
    "data.max_text_length",
)
# Fields that decide which samples come next: changed, the data order does not continue.
DATA_ORDER = (
    "data.train_shards",
    "data.num_workers",
    "data.shuffle_buffer",
    "data.seed",
    "micro_batch_size",
    "grad_accum_steps",
)


@dataclass
class StartPlan:
    """What preflight established, for the start-up that follows."""

    dp_size: int
    ds_config: dict[str, Any]
    tokenizer: Tokenizer
    resume_from: Optional[Path]
    train_shards: list[str]
    eval_batches: list[Batch]

    @property
    def eval_samples(self) -> int:
        return sum(len(batch["keys"]) for batch in self.eval_batches)


def parallel_layout(world_size: int, tensor_parallel: int, data_parallel: int) -> dict[str, int]:
    """The parallel sizes a checkpoint is tied to."""
    return {"world_size": world_size, "tensor_parallel": tensor_parallel, "data_parallel": data_parallel}


def resolve_resume(resume: str, checkpoint_dir: str) -> Optional[Path]:
    """Map --resume (auto | none | a checkpoint path) to the checkpoint to load, if any.

    ``auto`` takes the newest complete checkpoint and says which incomplete ones it passed
    over. ``none`` refuses a directory that already holds complete checkpoints, which a new run
    would otherwise overwrite step by step.
    """
    if resume == "auto":
        chosen = latest_complete(checkpoint_dir)
        _report_incomplete(checkpoint_dir, chosen)
        return chosen
    if resume == "none":
        existing = latest_complete(checkpoint_dir)
        if existing is not None:
            raise ConfigError(
                f"checkpoint.dir={checkpoint_dir} already holds checkpoints (newest: {existing.name}); "
                "pass --resume auto to continue that run, or choose another checkpoint.dir"
            )
        return None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory (use auto, none or a path)")
    return path


def _step_of(path: Optional[Path]) -> int:
    return -1 if path is None else int(path.name.removeprefix("global_step"))


def _report_incomplete(checkpoint_dir: str, chosen: Optional[Path]) -> None:
    target = f"resuming from {chosen.name}" if chosen is not None else "no complete checkpoint: starting at step 0"
    for step, path in incomplete_checkpoints(checkpoint_dir):
        if step > _step_of(chosen):
            log.warning(
                "--resume auto skips %s: it has no %s, so its save did not finish (the run stopped while "
                "writing it); %s, and the run rewrites that tag when it reaches step %d again",
                path,
                MARKER,
                target,
                step,
            )
        else:
            log.info("ignoring %s: an older checkpoint without %s", path, MARKER)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes(names: list[str], old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{name} {old.get(name)!r} -> {new.get(name)!r}" for name in names)


def check_resume_config(checkpoint: Path, config: TrainConfig, tokenizer: Tokenizer) -> None:
    """Compare the config saved in ``checkpoint``'s marker with ``config``; refuse what cannot change.

    Raises:
        ConfigError: naming every field that differs and would fail to load or be ignored.
    """
    marker = read_marker(checkpoint)
    if "config" not in marker:
        log.warning("%s holds no saved config (an older megamm wrote it); cannot compare it with this one", checkpoint)
        return
    old, new = _flatten(marker["config"]), _flatten(to_dict(config))
    differing = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    refused = [name for name in differing if name.startswith(FROM_CHECKPOINT)]
    saved_tokenizer = marker.get("tokenizer_sha256")
    tokenizer_changed = saved_tokenizer is not None and saved_tokenizer != tokenizer.fingerprint
    if refused or tokenizer_changed:
        parts = [_changes(refused, old, new)] if refused else []
        if tokenizer_changed:
            parts.append(f"data.tokenizer={config.data.tokenizer} is another SentencePiece model than the saved one")
        raise ConfigError(
            f"checkpoint {checkpoint} was saved with other settings: {'; '.join(parts)}. A resumed run "
            "continues the checkpoint's model and optimizer state, so these would fail to load or be "
            "silently ignored. Resume with the saved values (they are in the checkpoint's "
            f"{MARKER}), or start a new run with another checkpoint.dir"
        )
    data_order = [name for name in differing if name.startswith(DATA_ORDER)]
    if data_order:
        log.warning(
            "resuming with a changed data stream (%s): the run does not continue its sample order exactly; "
            "samples may repeat or be skipped",
            _changes(data_order, old, new),
        )
    others = [name for name in differing if name not in data_order]
    if others:
        log.info("resuming with changed settings: %s", _changes(others, old, new))


def _shards(count: int) -> str:
    return f"{count} shard" if count == 1 else f"{count} shards"


def check_data(config: TrainConfig, dp_size: int, tokenizer: Tokenizer) -> tuple[list[str], list[Batch]]:
    """Resolve and check both splits; read the evaluation set. Logs what each split resolved to."""
    data = config.data
    train = expand_shards(data.train_shards, "data.train_shards")
    check_shard_count(train, data, dp_size)
    check_shards_readable(train, "data.train_shards", read_header=False)
    eval_shards = expand_shards(data.eval_shards, "data.eval_shards")
    check_shards_readable(eval_shards, "data.eval_shards", read_header=True)
    eval_batches = list(iter_eval_batches(data, tokenizer, config.micro_batch_size))

    samples = known_sample_count(train)
    described = f"{samples} samples" if samples is not None else f"sample count unknown (no {SIZES_FILE} beside them)"
    log.info("data.train_shards: %s, %s; %d per data-parallel rank", _shards(len(train)), described, len(train) // dp_size)
    eval_samples = sum(len(batch["keys"]) for batch in eval_batches)
    log.info("data.eval_shards: %s, %d usable samples", _shards(len(eval_shards)), eval_samples)
    return train, eval_batches


def preflight(config: TrainConfig, ds_config_path: str, resume: str, info: LaunchInfo) -> StartPlan:
    """Every check that needs no process group, in the order a user would fix them. Writes nothing.

    Raises:
        ConfigError: the first problem found, naming the field or file and the fix.
    """
    dp_size = config.parallel.data_parallel_size(info.world_size)
    ds_config = build_ds_config(load_template(ds_config_path), config, dp_size)
    check_precision(config.precision)
    tokenizer = Tokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but model.text.vocab_size="
            f"{config.model.text.vocab_size}; raise model.text.vocab_size to at least that"
        )
    checkpoint = resolve_resume(resume, config.checkpoint.dir)
    if checkpoint is not None:
        try:
            check_layout(checkpoint, parallel_layout(info.world_size, config.parallel.tensor_parallel, dp_size))
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from None
        check_resume_config(checkpoint, config, tokenizer)
    train_shards, eval_batches = check_data(config, dp_size, tokenizer)
    prepare_rendezvous(info)
    return StartPlan(dp_size, ds_config, tokenizer, checkpoint, train_shards, eval_batches)


__all__ = [
    "DATA_ORDER",
    "FROM_CHECKPOINT",
    "StartPlan",
    "check_data",
    "check_resume_config",
    "parallel_layout",
    "preflight",
    "resolve_resume",
]
