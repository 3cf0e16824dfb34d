"""Builds the DeepSpeed JSON config: a template's ZeRO knobs + batch sizes from megamm's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megamm.config import ConfigError, TrainConfig


# Top-level DeepSpeed settings a template may hold and megamm passes on unchanged. Anything
# else is refused: DeepSpeed itself ignores unknown keys, so a typo would pass silently.
PASSED_ON = frozenset(
    {
        "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
        "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "prescale_gradients",
        "gradient_predivide_factor", "communication_data_type", "seq_parallel_communication_data_type",
        "activation_checkpointing", "flops_profiler", "comms_logger", "aio", "checkpoint", "data_types",
        "bf16", "fp16", "gradient_clipping", "dump_state", "compile",
    }
)  # fmt: skip
# Sections megamm replaces with its own settings: refused, with where the setting lives instead.
OWNED_SECTIONS = {
    "train_batch_size": "micro_batch_size / grad_accum_steps",
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "optimizer": "optim.* (megamm builds AdamW itself)",
    "scheduler": "optim.warmup_steps / optim.min_lr_ratio (megamm builds the schedule itself)",
    "tensorboard": "logging.tensorboard_dir (megamm writes TensorBoard itself)",
    "pipeline": "parallel.pipeline_parallel / parallel.pipeline_partition (megamm sets the pipeline engine up itself)",
}


def load_template(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed template (ds_configs/*.json) with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass --ds-config ds_configs/zero3.json")
    try:
        template = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None
    if not isinstance(template, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object {{...}}, not a {type(template).__name__}")
    return template


def check_template(template: dict[str, Any], config: TrainConfig) -> None:
    """Refuse a template that sets what megamm's config owns differently, or keys megamm would drop.

    The template holds DeepSpeed's own knobs (ZeRO buckets, offload, ...); batch sizes,
    optimizer, schedule, precision, clipping and the ZeRO stage come from the megamm config. A
    template may repeat those values only if they agree with it.
    """
    for key, instead in OWNED_SECTIONS.items():
        if key in template:
            raise ConfigError(f"the DeepSpeed template sets {key!r}; remove it and set {instead} in the megamm config")
    unknown = sorted(set(template) - PASSED_ON)
    if unknown:
        raise ConfigError(
            f"the DeepSpeed template sets {', '.join(map(repr, unknown))}, which megamm does not pass on; "
            f"remove it (a typo?). Known: {', '.join(sorted(PASSED_ON))}"
        )
    zero = template.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(
            f"the DeepSpeed template's 'zero_optimization' must be an object like {{\"stage\": 3}}, got {zero!r}"
        )
    _agree(zero.get("stage"), config.parallel.zero_stage, "'zero_optimization.stage'", "parallel.zero_stage")
    _agree(template.get("gradient_clipping"), config.optim.grad_clip, "'gradient_clipping'", "optim.grad_clip")
    for precision in ("bf16", "fp16"):
        section = template.get(precision, {})
        if not isinstance(section, dict):
            raise ConfigError(f"the DeepSpeed template's {precision!r} must be an object, got {section!r}")
        if "enabled" in section and bool(section["enabled"]) != (config.precision == precision):
            raise ConfigError(
                f"the DeepSpeed template sets '{precision}.enabled': {section['enabled']} but precision="
                f"{config.precision}; choose the precision with precision=fp32|bf16|fp16 and drop 'enabled'"
            )


def _agree(template_value: Any, config_value: Any, template_key: str, config_field: str) -> None:
    if template_value is not None and template_value != config_value:
        raise ConfigError(
            f"the DeepSpeed template sets {template_key}: {template_value!r} but {config_field}="
            f"{config_value!r}; the megamm config decides: drop it from the template or set {config_field}"
        )


def effective_zero_stage(requested: int, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs: ``requested``, or 0 in a single process.

    ZeRO partitions parameters, gradients and optimizer state over data-parallel ranks. A
    single process has nothing to partition, and ZeRO-3's gather/release hooks around every
    module then only cost time (1.5x the step time of the ``tiny`` recipe). Stage 0 computes
    the same numbers, as torchtitan likewise skips FSDP at a sharding degree of 1.
    """
    return 0 if world_size == 1 else requested


def build_ds_config(template: dict[str, Any], config: TrainConfig, dp_size: int) -> dict[str, Any]:
    """Fill batch sizes, clipping, precision and the ZeRO stage from ``config``.

    The template is checked first (:func:`check_template`): megamm's config owns these values
    and never silently replaces a different one. The ZeRO stage run is :func:`effective_zero_stage`.
    """
    check_template(template, config)
    ds = json.loads(json.dumps(template))  # deep copy
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    ds["gradient_accumulation_steps"] = config.grad_accum_steps
    ds["train_batch_size"] = config.micro_batch_size * config.grad_accum_steps * dp_size
    ds["gradient_clipping"] = config.optim.grad_clip
    world_size = dp_size * config.parallel.tensor_parallel * config.parallel.pipeline_parallel
    ds.setdefault("zero_optimization", {})["stage"] = effective_zero_stage(config.parallel.zero_stage, world_size)
    for precision in ("bf16", "fp16"):
        ds[precision] = {**template.get(precision, {}), "enabled": config.precision == precision}
    if config.parallel.pipeline_parallel > 1:
        # Stages pass a tuple of streams that all need gradients; DeepSpeed's partitioning of
        # activations over the tensor-parallel group handles a single such tensor only.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds
