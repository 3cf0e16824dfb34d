"""The only package that imports DeepSpeed: engine construction, configs, checkpoints."""

from megamm.engine.builder import build_engine, warmup_cosine
from megamm.engine.checkpoint import (
    check_layout,
    complete_checkpoints,
    latest_complete,
    load_checkpoint,
    save_checkpoint,
)
from megamm.engine.distributed import device, init_distributed
from megamm.engine.ds_config import build_ds_config, load_template

__all__ = [
    "build_ds_config",
    "build_engine",
    "check_layout",
    "complete_checkpoints",
    "device",
    "init_distributed",
    "latest_complete",
    "load_checkpoint",
    "load_template",
    "save_checkpoint",
    "warmup_cosine",
]
