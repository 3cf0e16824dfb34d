"""The only package that imports DeepSpeed: engine construction, configs, checkpoints."""

from megamm.engine.builder import build_engine, clamp_parameters, loss_scale, warmup_cosine
from megamm.engine.checkpoint import (
    ABANDONED,
    MARKER,
    CheckpointSaveError,
    check_shared_directory,
    check_layout,
    complete_checkpoints,
    incomplete_checkpoints,
    latest_complete,
    load_checkpoint,
    load_model_weights,
    read_marker,
    save_checkpoint,
    set_aside_abandoned,
)
from megamm.engine.distributed import (
    LaunchInfo,
    check_precision,
    device,
    free_port,
    init_distributed,
    is_collective_timeout,
    is_peer_failure,
    launch_info,
    prepare_rendezvous,
    synchronize,
)
from megamm.engine.ds_config import build_ds_config, load_template
from megamm.engine.preemption import STOP_SIGNALS, Preempted, StopRequest
from megamm.engine.runlock import DirectoryLocked, LockLost, RunLock
from megamm.engine.runner import Inputs, PipelineRunner, PlainRunner, StepRunner, make_runner
from megamm.engine.watchdog import Watchdog

__all__ = [
    "ABANDONED",
    "MARKER",
    "STOP_SIGNALS",
    "CheckpointSaveError",
    "DirectoryLocked",
    "Inputs",
    "LaunchInfo",
    "LockLost",
    "PipelineRunner",
    "PlainRunner",
    "Preempted",
    "RunLock",
    "StepRunner",
    "StopRequest",
    "Watchdog",
    "build_ds_config",
    "build_engine",
    "check_layout",
    "check_precision",
    "check_shared_directory",
    "clamp_parameters",
    "complete_checkpoints",
    "device",
    "free_port",
    "incomplete_checkpoints",
    "init_distributed",
    "is_collective_timeout",
    "is_peer_failure",
    "latest_complete",
    "launch_info",
    "load_checkpoint",
    "load_model_weights",
    "load_template",
    "loss_scale",
    "make_runner",
    "prepare_rendezvous",
    "read_marker",
    "save_checkpoint",
    "set_aside_abandoned",
    "synchronize",
    "warmup_cosine",
]
