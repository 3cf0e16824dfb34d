"""Model construction under ZeRO-3, optimizer, learning-rate schedule and DeepSpeed engine construction."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
from typing import Any, Callable, Iterator, Optional

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
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


def full_shape(param: torch.Tensor) -> torch.Size:
    """The shape of ``param`` as the model defines it (this tensor-parallel rank's), also when
    ZeRO-3 holds only a partition of it and ``param`` itself is an empty placeholder."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param: torch.Tensor) -> int:
    """The number of elements of ``param`` as the model defines it (see :func:`full_shape`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def zero3_builds(ds_config: Optional[dict[str, Any]], parallel: ParallelState) -> bool:
    """Whether :func:`model_construction` partitions the model as it is built: ZeRO stage 3 with
    more than one process (a pipeline is never ZeRO-3: the config refuses it)."""
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    return stage == 3 and parallel.world_size > 1 and parallel.pp_size == 1


_INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip
"""The in-place initialisers of ``torch.nn.init`` that :func:`model_construction` makes act on the
whole of a parameter ZeRO-3 has already partitioned."""


def _on_whole_parameter(initialiser: Callable[..., Any]) -> Callable[..., Any]:
    """``initialiser``, applied to the whole parameter when it is given a partitioned ZeRO-3 one.

    A module that sets a child's weight after the child's constructor has returned (a projection
    redrawing its ``nn.Linear``'s weight) meets a parameter ZeRO-3 has partitioned already: its
    ``data`` is an empty placeholder, and the initialiser would silently do nothing. Here the
    parameter is gathered (this one parameter: at most one layer's full weight), initialised as
    without ZeRO, broadcast from data-parallel rank 0 (every rank drew the same numbers) and
    partitioned again. Collective over the data-parallel group, as every rank builds the model.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    @functools.wraps(initialiser)
    def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if getattr(tensor, "ds_status", None) != ZeroParamStatus.NOT_AVAILABLE:
            return initialiser(tensor, *args, **kwargs)  # a plain tensor, or one gathered already
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            initialiser(tensor, *args, **kwargs)
        return tensor

    return initialise


@contextlib.contextmanager
def _initialisers_on_whole_parameters() -> Iterator[None]:
    """Within the block, ``torch.nn.init``'s initialisers act on whole ZeRO-3 parameters
    (:func:`_on_whole_parameter`); restored afterwards."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS if hasattr(nn.init, name)}
    for name, initialiser in saved.items():
        setattr(nn.init, name, _on_whole_parameter(initialiser))
    try:
        yield
    finally:
        for name, initialiser in saved.items():
            setattr(nn.init, name, initialiser)


def _malloc_trim() -> Optional[Callable[[], Any]]:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


@contextlib.contextmanager
def _freed_memory_returned() -> Iterator[None]:
    """Within the block, the allocator hands freed memory back to the system each time a module has
    been built (and, under zero.Init, partitioned), i.e. whenever a submodule is assigned.

    glibc raises its mmap threshold (up to 32 MB) whenever a large block is freed; from then on a
    layer's transient master weight comes from the heap, between partitions that stay, and its pages
    are kept after it is freed. Building a ~1B-parameter model on 4 ranks, that kept 1.4 GB a rank
    on top of its 1 GB of partitions (docs/benchmarks/build_memory); returned after every module, the
    resident memory stays at the partitions plus the layer being built.
    """
    trim = _malloc_trim()
    if trim is None:
        yield
        return

    def built(module: nn.Module, name: str, submodule: Optional[nn.Module]) -> None:
        trim()  # returns None: a registration hook's result would replace the submodule

    handle = nn.modules.module.register_module_module_registration_hook(built)
    try:
        yield
    finally:
        handle.remove()
        trim()


@contextlib.contextmanager
def model_construction(ds_config: Optional[dict[str, Any]], parallel: ParallelState) -> Iterator[None]:
    """Build the model inside this block: under ZeRO-3 no rank ever holds the whole model.

    Under ZeRO stage 3 (:func:`zero3_builds`) this is DeepSpeed's ``zero.Init``: as each module's
    constructor returns, its own parameters are split over the data-parallel group and each rank
    keeps its partition (``param.ds_tensor``; ``param`` itself becomes an empty placeholder of
    ``ds_shape``). A tensor-parallel layer draws its full master weight, keeps its slice and
    returns, so a layer's full weight exists only inside its constructor: a rank holds its
    partitions plus at most one layer, and the weights are exactly those of a model built without
    ZeRO (tensor_parallel=N is still tensor_parallel=1 split up). The partitions are those the
    engine makes (``build_engine`` adopts them): over the data-parallel group, in the precision
    and on the device (``offload_param``) the DeepSpeed config asks for; the weights are drawn in
    that precision. ``torch.nn.init``'s initialisers applied to an already partitioned parameter
    act on all of it (:func:`_on_whole_parameter`).

    Otherwise (ZeRO 0-2, one process, a pipeline) the block runs as it is: every rank builds its
    whole tensor-parallel shard, and the engine partitions what ZeRO partitions afterwards.
    Every rank of the job must build the model in this block (collective under ZeRO-3).
    """
    if not zero3_builds(ds_config, parallel):
        yield
        return
    if not deepspeed.comm.is_initialized():  # torch.distributed joined without DeepSpeed (tests)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    with deepspeed.zero.Init(
        config_dict_or_path=ds_config,
        mpu=parallel,
        data_parallel_group=parallel.dp_group,  # DeepSpeed's default is the whole world, across TP shards
        remote_device=None,  # the config's offload_param device, else the local device
        enabled=True,
    ):
        with _initialisers_on_whole_parameters(), _freed_memory_returned():
            yield


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; leave biases, norms, embeddings of positions and scalars undecayed.

    Shapes are the parameters' own (:func:`full_shape`), also for ZeRO-3 placeholders."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(full_shape(param)) < 2 or "position_embedding" in name or "class_token" in name:
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
