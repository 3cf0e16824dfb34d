"""Process-group start-up through DeepSpeed (device-agnostic: gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import os

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator


# Environment variables by which a launcher announces a multi-process job.
_LAUNCHER_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def init_distributed() -> None:
    """Join the job started by a launcher (deepspeed, torchrun; MPI through DeepSpeed's discovery).

    A plain ``python launchers/pretrain.py`` without launcher variables runs as a world of one
    on 127.0.0.1.
    """
    if not any(name in os.environ for name in _LAUNCHER_VARIABLES):
        single = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
        for name, value in single.items():
            os.environ.setdefault(name, value)
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count wins
        # Ranks on this host: torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        names = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE")
        local_world = next((int(os.environ[name]) for name in names if name in os.environ), 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())


def device() -> torch.device:
    """This rank's compute device."""
    return torch.device(get_accelerator().current_device_name())
