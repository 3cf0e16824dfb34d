"""Optimizer, learning-rate schedule and DeepSpeed engine construction."""

from __future__ import annotations

import math
from typing import Any, Optional

import deepspeed
import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_local_fp32_param,
    safe_set_full_fp32_param,
    safe_set_local_fp32_param,
)
from torch import nn

from megamm.config import OptimConfig
from megamm.model import CLAMP_ATTRIBUTE
from megamm.parallel import ParallelState


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave biases, norms, embeddings of positions and scalars undecayed."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "position_embedding" in name or "class_token" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(
    model: nn.Module, optim: OptimConfig, total_steps: int, ds_config: dict[str, Any], parallel: ParallelState
) -> deepspeed.DeepSpeedEngine:
    """Wrap ``model`` in a DeepSpeed engine with AdamW and a warmup-cosine schedule.

    The optimizer and schedule are ours (torch AdamW, LambdaLR), so they behave the same on
    every accelerator; DeepSpeed saves and restores both with its checkpoints. A
    ``PipelineModule`` gets a ``PipelineEngine``, which takes its grid from the module (our
    ``ParallelState`` describes the same groups).
    """
    pipeline = isinstance(model, deepspeed.PipelineModule)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas, eps=optim.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, optim.warmup_steps, total_steps, optim.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=parallel if parallel.world_size > 1 and not pipeline else None,
    )
    return engine


def clamp_parameters(engine: deepspeed.DeepSpeedEngine) -> None:
    """Clamp every parameter that carries ``CLAMP_ATTRIBUTE = (low, high)`` in place, after a step.

    The optimizer's fp32 master copy is clamped too (under ZeRO that copy is what the next step
    updates), so a parameter pushed past its bound by momentum comes back into range at once and
    keeps a gradient; clamping only in the forward pass would freeze it there for good. This is
    how OpenCLIP bounds its logit scale. Collective under ZeRO: every rank calls it.
    """
    for param in engine.module.parameters():
        bounds = getattr(param, CLAMP_ATTRIBUTE, None)
        if bounds is None:
            continue
        low, high = bounds
        with torch.no_grad():
            if hasattr(param, "ds_id"):  # ZeRO-3: each rank clamps its own partition, no collective
                safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
                param.ds_tensor.clamp_(low, high)
                param.data.clamp_(low, high)  # a persistent (small, never released) parameter's full copy
                continue
            master = safe_get_full_fp32_param(param)  # ZeRO 1/2: a collective over the DP group
            if master is not None:
                safe_set_full_fp32_param(param, master.clamp(low, high))
            param.clamp_(low, high)  # the module's copy (without ZeRO, the only one)


def loss_scale(engine: Any) -> Optional[float]:
    """The dynamic loss scale of an fp16 engine (None in fp32 and bf16, which need none)."""
    if not engine.fp16_enabled():
        return None
    scale = getattr(engine.optimizer, "loss_scale", None)
    return None if scale is None else float(scale)
