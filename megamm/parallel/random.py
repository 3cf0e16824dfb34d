"""Tensor-parallel-aware random numbers, and activation checkpointing that replays them.

Dropout must agree across the ranks of a tensor-parallel group where they hold the same
activations (outside tensor-parallel regions: residual streams, norms) and differ where each
holds its own slice (inside them: attention probabilities of its heads, its MLP features), as in
Megatron-LM. So two random streams exist on every rank:

- the **default** generator, seeded alike on every rank of a tensor-parallel group;
- the **tensor-parallel** stream, seeded ``seed + 2718 + tp_rank``, entered with
  ``with get_rng_tracker().fork():`` around the random ops of a tensor-parallel region.

Both live on the device that draws (the CPU generator on CPU, the accelerator's on GPUs).
:func:`checkpoint` recomputes a block in the backward pass with the random states its forward
pass saw, both streams included, so a checkpointed run equals an uncheckpointed one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

TENSOR_PARALLEL_RNG = "tensor-parallel-rng"
_TP_SEED_OFFSET = 2718


def _device_rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_device_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named random states of one device; :meth:`fork` draws from one of them for a while.

    Usage::

        tracker.add(TENSOR_PARALLEL_RNG, seed)
        with tracker.fork():          # random ops here use (and advance) the named state
            x = F.dropout(x, p, training=True)
    """

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.states: dict[str, torch.Tensor] = {}

    def reset(self, device: Optional[torch.device] = None) -> None:
        self.states = {}
        if device is not None:
            self.device = torch.device(device)

    def add(self, name: str, seed: int) -> None:
        """Create state ``name`` seeded with ``seed``, leaving the default state as it was."""
        if name in self.states:
            raise ValueError(f"random state {name!r} exists already")
        saved = _device_rng_state(self.device)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states[name] = _device_rng_state(self.device)
        _set_device_rng_state(self.device, saved)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = TENSOR_PARALLEL_RNG) -> Iterator[None]:
        """Draw from state ``name`` inside the block; the default state resumes where it was."""
        if name not in self.states:
            raise KeyError(f"random state {name!r} was never added; call model_parallel_seed first")
        saved = _device_rng_state(self.device)
        _set_device_rng_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _device_rng_state(self.device)
            _set_device_rng_state(self.device, saved)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process's tracker (one per process, like the default generator)."""
    return _TRACKER


def model_parallel_seed(seed: int, tp_rank: int, device: Optional[torch.device] = None) -> None:
    """Seed the default generator with ``seed`` (alike on every rank of a tensor-parallel group)
    and the tensor-parallel stream with ``seed + 2718 + tp_rank`` (different on every rank)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    torch.manual_seed(seed)
    _TRACKER.reset(device)
    _TRACKER.add(TENSOR_PARALLEL_RNG, seed + _TP_SEED_OFFSET + tp_rank)


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, function: Callable[..., torch.Tensor], device: torch.device, *args: Any) -> Any:
        ctx.function, ctx.device = function, device
        ctx.cpu_state = torch.get_rng_state()
        ctx.device_state = _device_rng_state(device) if device.type != "cpu" else None
        ctx.tracker_states = _TRACKER.get_states()
        tensors = [arg for arg in args if torch.is_tensor(arg)]
        ctx.layout = [torch.is_tensor(arg) for arg in args]
        ctx.others = [arg for arg in args if not torch.is_tensor(arg)]
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
        needs_grad = iter(ctx.needs_input_grad[2:])  # aligned with *args
        inputs = []
        for is_tensor in ctx.layout:
            wanted = next(needs_grad)
            inputs.append(next(tensors).detach().requires_grad_(wanted) if is_tensor else next(others))
        # Replay the forward pass's random streams, then put today's back.
        now_cpu, now_tracker = torch.get_rng_state(), _TRACKER.get_states()
        now_device = _device_rng_state(ctx.device) if ctx.device.type != "cpu" else None
        torch.set_rng_state(ctx.cpu_state)
        if ctx.device_state is not None:
            _set_device_rng_state(ctx.device, ctx.device_state)
        _TRACKER.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*inputs)
        finally:
            torch.set_rng_state(now_cpu)
            if now_device is not None:
                _set_device_rng_state(ctx.device, now_device)
            _TRACKER.set_states(now_tracker)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if torch.is_tensor(out) and out.requires_grad]
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
        input_grads = tuple(arg.grad if torch.is_tensor(arg) and arg.requires_grad else None for arg in inputs)
        return (None, None, *input_grads)


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` without keeping its activations: they are recomputed in the backward
    pass, under the random states (default and tensor-parallel) the forward pass drew from, so
    dropout masks repeat exactly. Gradients reach the tensor arguments and ``function``'s
    parameters."""
    device = next((arg.device for arg in args if torch.is_tensor(arg)), torch.device("cpu"))
    return _Checkpoint.apply(function, device, *args)


__all__ = ["RNGStatesTracker", "TENSOR_PARALLEL_RNG", "checkpoint", "get_rng_tracker", "model_parallel_seed"]
