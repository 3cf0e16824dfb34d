"""Start-up checks that need no process group: every cheap file and config check a run can fail.

``run_pretraining`` calls :func:`preflight` on every rank before ``torch.distributed`` starts,
so a mistake costs seconds instead of an allocation. Preflight writes nothing: the DeepSpeed
template, the precision against the device, the tokenizer, the shards of both splits (and the
evaluation set down to its first usable sample), the checkpoint to resume from with its
parallel layout, saved config and data stream, and rank 0's rendezvous port. Any failure is a
:class:`~megamm.config.ConfigError` naming the field or file and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megamm.config import ConfigError, TrainConfig, to_dict
from megamm.data import (
    SIZES_FILE,
    UNK_ID,
    Batch,
    Source,
    Tokenizer,
    build_sources,
    check_shard_count,
    check_shards_readable,
    stream_count,
    data_stream_settings,
    expand_shards,
    iter_eval_batches,
    known_sample_count,
)
from megamm.engine import (
    ABANDONED,
    MARKER,
    LaunchInfo,
    build_ds_config,
    check_layout,
    check_precision,
    form_for,
    incomplete_checkpoints,
    latest_complete,
    load_template,
    prepare_rendezvous,
    read_marker,
    universal_form,
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
# What the data position's settings are called in the config (see data_stream_settings).
DATA_STREAM_FIELDS = {
    "format": "the data position's format (an older megamm saved it)",
    "sources": "data.train_shards / data.sources (the shard files, their weights or index)",
    "seed": "data.seed",
    "sampling": "data.sampling",
    "shuffle_buffer": "data.shuffle_buffer",
    "open_shards": "data.open_shards",
    "global_batches": "data.global_batches",
}
"""The data stream settings a resumed run must keep (``streams`` may change: see StartPlan.streams_changed)."""


@dataclass
class StartPlan:
    """What preflight established, for the start-up that follows."""

    dp_size: int
    ds_config: dict[str, Any]
    tokenizer: Tokenizer
    resume_from: Optional[Path]
    sources: list[Source]
    """The training data's sources, resolved."""
    data_stream: dict[str, Any]
    """The settings the training data position depends on (recorded in each checkpoint)."""
    restart_data: bool = False
    """Resume the model but read the training data from its beginning."""
    init_from: Optional[Path] = None
    """A checkpoint whose weights (only) start this run, when it does not resume its own."""
    saved_streams: Optional[int] = None
    """The number of training streams of the checkpoint resumed, if it differs from this run's: its
    stream positions do not carry over, and each source restarts at its next epoch."""

    @property
    def streams_changed(self) -> bool:
        return self.saved_streams is not None


def parallel_layout(world_size: int, tensor_parallel: int, data_parallel: int, pipeline_parallel: int = 1) -> dict[str, int]:
    """The parallel sizes a checkpoint is tied to."""
    return {
        "world_size": world_size,
        "tensor_parallel": tensor_parallel,
        "pipeline_parallel": pipeline_parallel,
        "data_parallel": data_parallel,
    }


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


def resolve_init_source(spec: str) -> Path:
    """The checkpoint a fine-tuning run starts from: a ``global_step<N>`` directory, or a
    ``checkpoint.dir`` (its newest complete checkpoint).

    Raises:
        ConfigError: ``spec`` is neither, the checkpoint is incomplete, or it records no config.
    """
    path = Path(spec)
    chosen = path if (path / MARKER).is_file() else None
    if chosen is None and path.is_dir() and not path.name.startswith("global_step"):
        chosen = latest_complete(path)
    if chosen is None:
        why = f"its save did not finish (no {MARKER})" if path.is_dir() else "no such directory"
        raise ConfigError(
            f"--from {spec}: not a complete megamm checkpoint ({why}); name a checkpoint.dir of a finished "
            "run or one of its global_step<N> directories"
        )
    if "config" not in read_marker(chosen):
        raise ConfigError(f"--from {spec}: {chosen} records no config (an older megamm wrote it)")
    return chosen


RESIZABLE = ("model.image.image_size",)
"""Model fields fine-tuning may change: the weights adapt on loading (the image embedding
interpolates its learned positions to the new patch grid)."""


def check_init_source(source: Path, config: TrainConfig, tokenizer: Tokenizer) -> None:
    """Refuse fine-tuning settings that the checkpoint's weights cannot serve.

    The weights fit only the model they were trained as (every ``model.*`` field but the image size,
    :data:`RESIZABLE`), sharded the same way (``parallel.tensor_parallel``; any data-parallel size
    and ZeRO stage is fine), and they mean what they mean only with the tokenizer they were trained
    with. The run must write its own checkpoints and TensorBoard events, never into the source run's.

    Raises:
        ConfigError: naming each field that differs and what to do.
    """
    marker = read_marker(source)
    saved = marker["config"]  # resolve_init_source made sure of it
    old, new = _saved_settings(saved), _flatten(to_dict(config))
    model_changes = sorted(
        name
        for name in old.keys() | new.keys()
        if name.startswith("model.") and name not in RESIZABLE and old.get(name) != new.get(name)
    )
    problems = []
    if model_changes:
        problems.append(
            f"the model differs ({_changes(model_changes, old, new)}): the weights fit only the model they "
            "were trained as; drop these overrides"
        )
    if marker.get("tensor_parallel") != config.parallel.tensor_parallel:
        problems.append(
            f"parallel.tensor_parallel={config.parallel.tensor_parallel} but the checkpoint is sharded over "
            f"{marker.get('tensor_parallel')} tensor-parallel ranks; use that (any data-parallel size works)"
        )
    if marker.get("tokenizer_sha256") not in (None, tokenizer.fingerprint):
        problems.append(
            f"data.tokenizer={config.data.tokenizer} is another SentencePiece model than the one the weights "
            "were trained with; use that one"
        )
    source_stages = marker.get("pipeline_parallel", 1)
    if source_stages > 1 or config.parallel.pipeline_parallel > 1:
        problems.append(
            f"fine-tuning reads and starts tensor-parallel weights only (the checkpoint has {source_stages} "
            f"pipeline stages, parallel.pipeline_parallel={config.parallel.pipeline_parallel}); use 1 for both"
        )
    source_dirs = (saved.get("checkpoint", {}).get("dir"), saved.get("logging", {}).get("tensorboard_dir"))
    for field_name, value, before in (
        ("checkpoint.dir", config.checkpoint.dir, source_dirs[0]),
        ("logging.tensorboard_dir", config.logging.tensorboard_dir, source_dirs[1]),
    ):
        if before is not None and Path(value).resolve() == Path(before).resolve():
            problems.append(f"{field_name}={value} is the source run's; give the fine-tuning run its own")
    if problems:
        raise ConfigError(f"cannot fine-tune from {source}: " + "; ".join(problems))


def check_universal_resume(checkpoint: Path, marker: dict[str, Any], config: TrainConfig, layout: dict[str, int]) -> None:
    """Refuse what a universal checkpoint (tools/convert_checkpoint.py) cannot resume into.

    Any tensor-parallel, data-parallel or ZeRO layout works, and any number of pipeline stages
    in the form the checkpoint was converted for (its marker's ``"form"``): the plain form
    (``parallel.pipeline_parallel=1``) names parameters by module, the pipeline form by layer,
    and ``convert_checkpoint.py --to`` writes either. Under another data-parallel size the saved
    stream positions do not carry over (unless ``data.global_batches`` keeps the streams the same):
    the training data restarts at each source's next epoch, and the run's log says so.
    """
    if config.parallel.zero_stage == 0 and layout["world_size"] > 1:
        raise ConfigError(
            f"{checkpoint} is a universal checkpoint, which DeepSpeed loads into a ZeRO optimizer only; "
            "set parallel.zero_stage to 1, 2 or 3"
        )
    stages_now = layout["pipeline_parallel"]
    held, needed = universal_form(marker), form_for(stages_now)
    if held != needed:
        source = marker.get("converted_from", "<the source global_stepN>")
        raise ConfigError(
            f"{checkpoint} was converted for the model's {held} form and parallel.pipeline_parallel={stages_now} "
            f"trains the {needed} one, whose parameters are named otherwise. Convert the source again with "
            f"--to {needed} (python tools/convert_checkpoint.py {source} --to {needed} --out <new checkpoint.dir>), "
            f"or resume this one with {'2 or more stages' if held == 'pipeline' else 'parallel.pipeline_parallel=1'}"
        )


def _step_of(path: Optional[Path]) -> int:
    return -1 if path is None else int(path.name.removeprefix("global_step"))


def _report_incomplete(checkpoint_dir: str, chosen: Optional[Path]) -> None:
    target = f"resuming from {chosen.name}" if chosen is not None else "no complete checkpoint: starting at step 0"
    for step, path in incomplete_checkpoints(checkpoint_dir):
        if step > _step_of(chosen):
            log.warning(
                "--resume auto skips %s: it has no %s, so its save did not finish (the run stopped while "
                "writing it); %s. The first save moves it, with any later tag, to %s/",
                path,
                MARKER,
                target,
                Path(checkpoint_dir) / ABANDONED,
            )
        else:
            log.info("ignoring %s: an older checkpoint without %s", path, MARKER)


def _saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config, flattened; a field it predates counts at its default (what the megamm
    that wrote it did, e.g. ``model.dropout`` 0)."""
    return {**_flatten(to_dict(TrainConfig())), **_flatten(saved)}


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


def check_resume_config(
    checkpoint: Path, config: TrainConfig, tokenizer: Tokenizer, data_stream: dict[str, Any], restart_data: bool
) -> Optional[int]:
    """Compare what ``checkpoint``'s marker saved with this run; refuse what cannot change.

    Refused: fields the checkpoint decides (:data:`FROM_CHECKPOINT`), another tokenizer, and
    (unless ``restart_data``) another data stream, under which the saved data position would
    name other samples. ``micro_batch_size`` may change: positions count samples.

    Raises:
        ConfigError: naming every field that differs and cannot.
    """
    marker = read_marker(checkpoint)
    if "config" not in marker:
        log.warning("%s holds no saved config (an older megamm wrote it); cannot compare it with this one", checkpoint)
        return
    old, new = _saved_settings(marker["config"]), _flatten(to_dict(config))
    differing = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    refused = [name for name in differing if name.startswith(FROM_CHECKPOINT)]
    parts = [_changes(refused, old, new)] if refused else []
    saved_tokenizer = marker.get("tokenizer_sha256")
    if saved_tokenizer is not None and saved_tokenizer != tokenizer.fingerprint:
        parts.append(f"data.tokenizer={config.data.tokenizer} is another SentencePiece model than the saved one")
    if parts:
        raise ConfigError(
            f"checkpoint {checkpoint} was saved with other settings: {'; '.join(parts)}. A resumed run "
            "continues the checkpoint's model and optimizer state, so these would fail to load or be "
            "silently ignored. Resume with the saved values (they are in the checkpoint's "
            f"{MARKER}), or start a new run with another checkpoint.dir"
        )
    saved_streams = _check_data_stream(checkpoint, marker.get("data_stream"), data_stream, restart_data)
    if differing:
        log.info("resuming with changed settings: %s", _changes(differing, old, new))
    return saved_streams


def _check_data_stream(
    checkpoint: Path, saved: Optional[dict[str, Any]], current: dict[str, Any], restart_data: bool
) -> Optional[int]:
    """Refuse a resume whose saved data position would name other samples; the saved number of
    streams when only that changed (None when it did not)."""
    if restart_data:
        return None
    if saved is None:
        log.warning("%s records no data stream settings (an older megamm wrote it); cannot check them", checkpoint)
        return None
    differing = [key for key in DATA_STREAM_FIELDS if saved.get(key) != current.get(key)]
    if differing:
        fields = sorted({DATA_STREAM_FIELDS[key] for key in differing})
        shown = [key for key in differing if key not in ("sources", "format")]
        details = ", ".join(f"{key} {saved.get(key)!r} -> {current.get(key)!r}" for key in shown)
        raise ConfigError(
            f"checkpoint {checkpoint} was saved reading another training data stream ({', '.join(fields)} "
            f"changed{': ' + details if details else ''}). Its data position says where each stream stands in "
            "its shards, so under these settings it would replay or skip data. Resume with the saved settings, "
            "or pass --restart-data to read the new data from its beginning (the model and optimizer still resume)"
        )
    return None if saved.get("streams") == current["streams"] else int(saved.get("streams", 0))


def _shards(count: int) -> str:
    return f"{count} shard" if count == 1 else f"{count} shards"


PROBE_SAMPLES = 32
"""Evaluation samples read before training to check that the data has what the model reads."""


def check_extras(config: TrainConfig, probe: Batch, tokenizer: Tokenizer) -> None:
    """The first evaluation samples must carry what the model's objectives read (audio, questions),
    and the tokenizer should know their words.

    Raises:
        ConfigError: the model reads audio or questions that none of the samples has.
    """
    model, rows = config.model, len(probe["keys"])
    if model.audio.enabled and not bool(probe["has_audio"].any()):
        raise ConfigError(
            f"model.audio.enabled=true but none of the first {rows} samples of data.eval_shards has a wav: use data "
            "with audio (tools/make_demo_data.py writes it), or set model.audio.enabled=false with "
            "model.objectives.audio_text=0 and model.objectives.image_audio=0"
        )
    if model.uses_questions and not bool(probe["question_mask"].any()):
        raise ConfigError(
            f"model.objectives.vqa / vqa_generative are on but none of the first {rows} samples of data.eval_shards "
            "has a qa.json: use data with questions, or set both to 0"
        )
    texts = [probe["text_ids"]] + ([probe["question_ids"], probe["answer_ids"]] if model.uses_questions else [])
    unknown = int(sum((ids == UNK_ID).any(dim=1).sum() for ids in texts))
    if unknown:
        log.warning(
            "%d of the first %d samples' captions%s hold pieces the tokenizer %s does not know; train it on this data "
            "(tools/train_tokenizer.py --force)",
            unknown, rows, " and questions" if model.uses_questions else "", config.data.tokenizer,
        )  # fmt: skip


def check_data(config: TrainConfig, dp_size: int, tokenizer: Tokenizer) -> list[Source]:
    """Resolve and check both splits (the evaluation set down to its first usable sample).

    Logs what each split resolved to; returns the training sources.
    """
    data = config.data
    if data.sources and data.train_shards != TrainConfig().data.train_shards:
        log.info("data.sources is given, so data.train_shards (%s) is not read", data.train_shards)
    sources = build_sources(data)
    check_shard_count(sources, data, dp_size)
    for source in sources:
        check_shards_readable(source.urls, f"data source {source.name}", read_header=False)
    eval_shards = expand_shards(data.eval_shards, "data.eval_shards")
    check_shards_readable(eval_shards, "data.eval_shards", read_header=True)
    extras, pairs = config.model.data_extras, config.model.data_pairs
    probe = next(iter(iter_eval_batches(data, tokenizer, PROBE_SAMPLES, extras=extras, pairs=pairs)))  # raises if none is usable
    check_extras(config, probe, tokenizer)

    streams = stream_count(data, dp_size)
    for source in sources:
        total = None if source.sizes is None else sum(source.sizes)
        dealt = f"dealt to {streams} stream{'s' if streams > 1 else ''}"
        split = f"{dealt} by sample" if total is not None else f"{dealt} by shard"
        described = f"{total} samples" if total is not None else f"sample count unknown (no {SIZES_FILE})"
        weight = f", weight {source.weight:g}" if len(sources) > 1 else ""
        log.info("training source %s: %s, %s%s; %s (data.sampling=%s)",
                 source.name, _shards(len(source.urls)), described, weight, split, data.sampling)  # fmt: skip
    samples = known_sample_count(eval_shards)
    described = f"{samples} samples" if samples is not None else f"sample count unknown (no {SIZES_FILE})"
    log.info("data.eval_shards: %s, %s", _shards(len(eval_shards)), described)
    return sources


def preflight(
    config: TrainConfig,
    ds_config_path: str,
    resume: str,
    info: LaunchInfo,
    restart_data: bool = False,
    init_from: Optional[Path] = None,
) -> StartPlan:
    """Every check that needs no process group, in the order a user would fix them. Writes nothing.

    ``init_from``: a checkpoint whose weights start the run (fine-tuning), checked against the
    config; a run that resumes its own checkpoint does not use it.

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
    sources = check_data(config, dp_size, tokenizer)
    data_stream = data_stream_settings(config.data, sources, dp_size)
    saved_streams = None
    checkpoint = resolve_resume(resume, config.checkpoint.dir)
    if checkpoint is not None:
        layout = parallel_layout(info.world_size, config.parallel.tensor_parallel, dp_size, config.parallel.pipeline_parallel)
        marker = read_marker(checkpoint)
        if marker.get("universal"):
            check_universal_resume(checkpoint, marker, config, layout)
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
            if ds_config["zero_optimization"]["stage"] == 0 and info.world_size == 1:
                # DeepSpeed reads universal checkpoints into ZeRO optimizers only; over one rank,
                # stage 1 computes what stage 0 does.
                ds_config["zero_optimization"]["stage"] = 1
        else:
            try:
                check_layout(checkpoint, layout)
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(str(error)) from None
        saved_streams = check_resume_config(checkpoint, config, tokenizer, data_stream, restart_data)
    elif restart_data:
        log.info("--restart-data: nothing to resume, so it changes nothing")
    if init_from is not None:
        check_init_source(init_from, config, tokenizer)
        if checkpoint is not None:
            log.info("resuming this fine-tuning run from %s; the weights of %s are not loaded again", checkpoint, init_from)
            init_from = None
    prepare_rendezvous(info)
    return StartPlan(
        dp_size, ds_config, tokenizer, checkpoint, sources, data_stream, restart_data, init_from, saved_streams
    )


__all__ = [
    "DATA_STREAM_FIELDS",
    "FROM_CHECKPOINT",
    "StartPlan",
    "check_data",
    "check_extras",
    "check_init_source",
    "check_resume_config",
    "parallel_layout",
    "preflight",
    "resolve_init_source",
    "resolve_resume",
]
