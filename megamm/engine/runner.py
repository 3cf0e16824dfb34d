"""One interface over DeepSpeed's two engines, so that one training loop drives both.

:class:`PlainRunner` runs micro-batches through a ``DeepSpeedEngine`` (forward, backward and
step each); :class:`PipelineRunner` hands them to a ``PipelineEngine``'s ``train_batch``, which
schedules forward and backward passes over the stages and steps once. The loop
(``megamm.train.Trainer``) sees only :class:`StepRunner`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist

from megamm.engine.builder import clamp_parameters
from megamm.engine.distributed import device
from megamm.parallel import ParallelState, layout

Inputs = dict[str, torch.Tensor]
"""The model's input tensors by keyword (image (B, C, S, S), text_ids (B, T), text_mask (B, T) bool,
and audio, questions and answers where the model reads them), on the host."""
Embeddings = dict[str, torch.Tensor]
"""L2-normalised (B, E) embeddings by modality (``"image"``, ``"text"``, ``"audio"``)."""
PIPELINE_INPUTS = ("image", "text_ids", "text_mask")
"""What the dual encoder's pipeline form's first stage reads, in order (the whole model's says its
``input_names``, :func:`megamm.model.pipeline.pipeline_inputs`)."""
Phase = Callable[[str], ContextManager[None]]


def _no_phase(name: str) -> ContextManager[None]:
    return contextlib.nullcontext()


class StepRunner:
    """Trains on and embeds batches with a DeepSpeed engine; every rank calls every method."""

    phases: tuple[str, ...] = ()
    """The phases :meth:`train_step` reports (besides the loop's own ``data_wait``)."""

    def __init__(self, engine: Any, parallel: ParallelState) -> None:
        self.engine = engine
        self.parallel = parallel
        self.device = device()

    def train_step(self, micro_batches: Sequence[Inputs], phase: Phase = _no_phase) -> float:
        """One optimizer step over ``micro_batches`` (gradient accumulation); returns the mean loss
        of this data-parallel rank (under pipeline parallelism, already averaged over ranks)."""
        raise NotImplementedError

    def embed(self, inputs: Inputs) -> Optional[Embeddings]:
        """Every modality's L2-normalised embeddings (B, E) of one batch, without gradients, on the
        ranks that compute them (all ranks, or a pipeline's last stage); None elsewhere."""
        raise NotImplementedError

    def share(self, value: Any) -> Any:
        """``value`` as computed on the ranks :meth:`embed` returns embeddings on, on every rank."""
        return value

    def _to_device(self, inputs: Inputs) -> Inputs:
        return {name: tensor.to(self.device, non_blocking=True) for name, tensor in inputs.items()}


class PlainRunner(StepRunner):
    """A ``DeepSpeedEngine`` (data and tensor parallelism, any ZeRO stage)."""

    phases = ("forward", "backward", "optimizer")

    def __init__(self, engine: Any, parallel: ParallelState) -> None:
        super().__init__(engine, parallel)
        self.objective_losses: dict[str, float] = {}
        """Each objective's own loss, this rank's mean over the last step's micro-batches."""

    def train_step(self, micro_batches: Sequence[Inputs], phase: Phase = _no_phase) -> float:
        total = 0.0
        parts: dict[str, float] = {}
        for inputs in micro_batches:
            with phase("forward"):
                out = self.engine(**self._to_device(inputs))
                loss = out["loss"]
            with phase("backward"):
                self.engine.backward(loss)
            with phase("optimizer"):
                self.engine.step()  # DeepSpeed steps at the last micro-batch only
            total += loss.item()
            for name, value in getattr(out, "losses", {}).items():
                parts[name] = parts.get(name, 0.0) + value.item() / len(micro_batches)
        with phase("optimizer"):
            clamp_parameters(self.engine)  # the logit scales, after the optimizer step
        self.objective_losses = parts
        return total / len(micro_batches)

    def embed(self, inputs: Inputs) -> Optional[Embeddings]:
        self.engine.eval()
        with torch.no_grad():
            out = self.engine(**self._to_device(inputs), compute_loss=False)
        self.engine.train()
        return {m: out[f"{m}_emb"] for m in ("image", "text", "audio") if out[f"{m}_emb"] is not None}


class PipelineRunner(StepRunner):
    """A ``PipelineEngine`` (pipeline x data x tensor parallelism, ZeRO stage 0 or 1).

    Every stage is handed the same micro-batches (the first stage reads the inputs the model's
    ``input_names`` name, in that order; the last the placeholder labels); the loss comes back from
    the last stage, averaged over data-parallel ranks, on every rank. :attr:`objective_losses`:
    each objective's own loss, this rank's mean over the last step's micro-batches, on the last
    stage (empty elsewhere).
    """

    phases = ("pipeline",)

    def __init__(self, engine: Any, parallel: ParallelState) -> None:
        super().__init__(engine, parallel)
        _buffers_by_dtype(engine)
        self.objective_losses: dict[str, float] = {}
        module = engine.module
        self.input_names: tuple[str, ...] = tuple(getattr(module, "input_names", PIPELINE_INPUTS))
        self.output_names: tuple[str, ...] = tuple(getattr(module, "output_names", ("image_emb", "text_emb", "scale")))

    def _data(self, micro_batches: Sequence[Inputs]) -> Any:
        return iter([(_pipeline_inputs(inputs, self.input_names), torch.zeros(1)) for inputs in micro_batches])

    def train_step(self, micro_batches: Sequence[Inputs], phase: Phase = _no_phase) -> float:
        data = self._data(micro_batches)
        with phase("pipeline"):
            loss = self.engine.train_batch(data)
            clamp_parameters(self.engine)
        take = getattr(self.engine.module, "take_objective_losses", None)
        self.objective_losses = take() if take is not None else {}
        return float(loss)

    def embed(self, inputs: Inputs) -> Optional[Embeddings]:
        data = self._data([inputs])
        # eval_batch sums its outputs into the loss total that the last train_batch left (a
        # scalar); our outputs are a tuple, so start the total afresh (train_batch does too).
        self.engine.total_loss = None
        _, outputs = self.engine.eval_batch(
            data, return_logits=True, compute_loss=False, reduce_output=None, num_micro_batches=1
        )
        self.engine.train()
        if not self.engine.is_last_stage():
            return None
        values = dict(zip(self.output_names, outputs))
        return {m: values[f"{m}_emb"] for m in ("image", "text", "audio") if f"{m}_emb" in values}

    def share(self, value: Any) -> Any:
        p = self.parallel
        source = layout.coords_to_rank(layout.Coordinates(p.pp_size - 1, 0, 0), p.world_size, p.tp_size, p.pp_size)
        box = [value if p.rank == source else None]
        dist.broadcast_object_list(box, src=source)
        return box[0]


def _buffers_by_dtype(engine: Any) -> None:
    """Make ``engine`` keep its receive buffers by (position, dtype).

    DeepSpeed's ``PipelineEngine`` keeps one pool of receive buffers by position in the tuple,
    shared by the activations a stage receives and the gradients it receives for what it sent,
    and reuses a large enough buffer whatever its dtype: a stage in the middle of the pipeline
    whose stream holds boolean or integer fields (masks, token ids) among its float ones would
    receive a mask into a float buffer. With one pool per dtype every field arrives in its own.
    """
    pool: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def allocate_or_extend(idx: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = pool.get((idx, dtype))
        if buffer is None or buffer.numel() < numel:
            pool[(idx, dtype)] = engine._allocate_buffer(shape, dtype=dtype, num_buffers=1)[0]
            return pool[(idx, dtype)]
        return buffer.flatten()[:numel].view(shape)

    engine._allocate_or_extend_buffers = allocate_or_extend


def _pipeline_inputs(inputs: Inputs, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The first stage's input tuple: ``inputs`` in the order of ``names``.

    Raises:
        KeyError: naming the inputs the model reads but the batch lacks.
    """
    missing = [name for name in names if name not in inputs]
    if missing:
        raise KeyError(f"the pipeline's first stage reads {', '.join(missing)}, which the batch lacks")
    return tuple(inputs[name] for name in names)


def make_runner(engine: Any, parallel: ParallelState) -> StepRunner:
    """The runner for ``engine``: a pipeline one when the model is split into stages."""
    return PipelineRunner(engine, parallel) if parallel.pp_size > 1 else PlainRunner(engine, parallel)


__all__ = ["Embeddings", "Inputs", "PIPELINE_INPUTS", "PipelineRunner", "PlainRunner", "StepRunner", "make_runner"]
