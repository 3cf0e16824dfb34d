"""Builds the DeepSpeed JSON config: a template's ZeRO knobs + batch sizes from megamm's config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megamm.config import ConfigError, TrainConfig


def load_template(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed template (ds_configs/*.json) with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config {path} does not exist; pass --ds-config ds_configs/zero3.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {error}") from None


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

    Batch sizes are owned by megamm's config; a template that sets them is rejected so that
    the two can never disagree. The ZeRO stage is :func:`effective_zero_stage`.
    """
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in template:
            raise ConfigError(
                f"the DeepSpeed template sets {key!r}; remove it and set micro_batch_size / "
                "grad_accum_steps in the megamm config instead"
            )
    ds = json.loads(json.dumps(template))  # deep copy
    ds["train_micro_batch_size_per_gpu"] = config.micro_batch_size
    ds["gradient_accumulation_steps"] = config.grad_accum_steps
    ds["train_batch_size"] = config.micro_batch_size * config.grad_accum_steps * dp_size
    ds["gradient_clipping"] = config.optim.grad_clip
    world_size = dp_size * config.parallel.tensor_parallel * config.parallel.pipeline_parallel
    ds.setdefault("zero_optimization", {})["stage"] = effective_zero_stage(config.parallel.zero_stage, world_size)
    for precision in ("bf16", "fp16"):
        ds[precision] = {**template.get(precision, {}), "enabled": config.precision == precision}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds
