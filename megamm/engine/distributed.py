"""Process-group start-up through DeepSpeed (device-agnostic: gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import os

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator


def init_distributed() -> None:
    """Join the job started by a launcher (deepspeed, torchrun, mpirun or a single process).

    A plain ``python launchers/pretrain.py`` without launcher variables runs as a world of one.
    """
    for name in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if "MASTER_ADDR" not in os.environ and os.environ["WORLD_SIZE"] == "1":
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", "29555")
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())


def device() -> torch.device:
    """This rank's compute device."""
    return torch.device(get_accelerator().current_device_name())
