"""Count the collectives torch.distributed runs, and Megatron's prediction for one transformer block.

:class:`CommCounter` replaces torch.distributed's collective functions for the duration of a ``with``
block and records every call: which function ran, on how many ranks, and how many bytes. Code that
calls them through the module (``dist.all_reduce(...)``, as :mod:`megamm.parallel.mappings`,
fairscale and DeepSpeed's ``comm`` do) is seen. A function taken by name before the block began
(``from torch.distributed import all_reduce``) is not, unless it delegates through
``torch.distributed.distributed_c10d``'s globals: in torch 2.13 ``all_gather_into_tensor`` and
``reduce_scatter_tensor`` (which DeepSpeed's ``comm`` keeps from its start-up) call
``all_gather_single`` and ``reduce_scatter_single``, and are recorded under those names. Collectives
that autograd runs during ``backward()`` are counted when the backward pass runs inside the block.

**Payload bytes** of a call are the bytes of the full, unsharded tensor the collective operates on,
whatever the number of ranks:

- ``all_reduce(t)``, ``broadcast(t)``, ``send(t)``, ``recv(t)``: ``t``;
- ``all_gather(parts, t)``: the gathered tensor, the sum of ``parts`` (``group size x t``);
- ``all_gather_into_tensor(out, t)``, ``_all_gather_base``, ``all_gather_single``: ``out``;
- ``reduce_scatter(out, parts)``: the tensor before scattering, the sum of ``parts``;
- ``reduce_scatter_tensor(out, t)``, ``_reduce_scatter_base``, ``reduce_scatter_single``: ``t``.

**Ring bytes** are a cost model, not a measurement: what each rank sends over the wire when the
collective runs as a bandwidth-optimal ring over ``p`` ranks on a payload of ``S`` bytes:
all-reduce ``2 (p - 1) / p * S`` (a reduce-scatter then an all-gather), all-gather and reduce-scatter
``(p - 1) / p * S``, broadcast ``(p - 1) / p * S`` (a pipelined chain, averaged over ranks), send ``S``,
recv ``0``. In these terms an all-reduce costs exactly one reduce-scatter plus one all-gather, which is
Megatron's argument that sequence parallelism adds no communication.

:func:`predicted_block_comm` is that analysis (Korthikanti et al., 2022, "Reducing Activation
Recomputation in Large Transformer Models", sequence parallelism) for one transformer block, forward and
backward, plus what the analysis leaves aside because it is not activations: under sequence
parallelism the gradients of the parameters every rank holds whole (LayerNorm weights and biases,
row-parallel biases) are summed over the group, ``hidden``-sized all-reduces.
:mod:`megamm.parallel.mappings` runs every collective as predicted on every backend (gloo included:
torch's gloo has a reduce-scatter).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, BROADCAST, SEND, RECV = (
    "all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv",
)  # fmt: skip
"""The collective kinds a record or a prediction names."""


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# function name -> (kind, payload bytes from the bound arguments)
_WRAPPED: dict[str, tuple[str, Callable[[dict[str, Any]], int]]] = {
    "all_reduce": (ALL_REDUCE, lambda a: _nbytes(a["tensor"])),
    "all_gather": (ALL_GATHER, lambda a: sum(_nbytes(t) for t in a["tensor_list"])),
    "all_gather_into_tensor": (ALL_GATHER, lambda a: _nbytes(a["output_tensor"])),
    "_all_gather_base": (ALL_GATHER, lambda a: _nbytes(a["output_tensor"])),
    "all_gather_single": (ALL_GATHER, lambda a: _nbytes(a["output_tensor"])),
    "reduce_scatter": (REDUCE_SCATTER, lambda a: sum(_nbytes(t) for t in a["input_list"])),
    "reduce_scatter_tensor": (REDUCE_SCATTER, lambda a: _nbytes(a["input"])),
    "_reduce_scatter_base": (REDUCE_SCATTER, lambda a: _nbytes(a["input"])),
    "reduce_scatter_single": (REDUCE_SCATTER, lambda a: _nbytes(a["input"])),
    "broadcast": (BROADCAST, lambda a: _nbytes(a["tensor"])),
    "send": (SEND, lambda a: _nbytes(a["tensor"])),
    "isend": (SEND, lambda a: _nbytes(a["tensor"])),
    "recv": (RECV, lambda a: _nbytes(a["tensor"])),
    "irecv": (RECV, lambda a: _nbytes(a["tensor"])),
}
_NAMESPACES: tuple[ModuleType, ...] = (dist, c10d)


def ring_bytes(kind: str, payload_bytes: int, group_size: int) -> float:
    """Bytes each rank sends when ``kind`` runs as a ring over ``group_size`` ranks (module docstring)."""
    p = group_size
    if p <= 1:
        return 0.0
    share = (p - 1) / p * payload_bytes
    return {
        ALL_REDUCE: 2 * share, ALL_GATHER: share, REDUCE_SCATTER: share, BROADCAST: share,
        SEND: float(payload_bytes), RECV: 0.0,
    }[kind]  # fmt: skip


@dataclass(frozen=True)
class Collective:
    """One collective: counted by :class:`CommCounter` or predicted by :func:`predicted_block_comm`.

    ``op`` is the torch.distributed function that ran (``all_gather`` or ``all_gather_into_tensor``,
    say) or, in a prediction, the kind; ``kind`` is the collective it performs; ``payload_bytes`` the
    bytes of the full tensor it operates on (module docstring); ``dtype`` the payload's element type.
    """

    kind: str
    payload_bytes: int
    group_size: int
    op: str = ""
    dtype: str = ""
    phase: str = ""
    """"forward" or "backward" in a prediction; empty in a record."""
    where: str = ""
    """In a prediction: which mapping of the block runs it."""
    parameters: tuple[str, ...] = ()
    """In a prediction: the parameters whose gradients it sums; empty when it moves activations."""

    @property
    def ring_bytes(self) -> float:
        return ring_bytes(self.kind, self.payload_bytes, self.group_size)

    def signature(self) -> tuple[str, int, int]:
        """(kind, payload bytes, group size): what a record and a prediction must agree on."""
        return (self.kind, self.payload_bytes, self.group_size)


def summarise(collectives: Iterable[Collective], by: str = "kind") -> dict[str, dict[str, float]]:
    """Per kind (or per ``op``): ``count``, ``payload_bytes`` and ``ring_bytes`` summed; plus ``total``."""
    summary: dict[str, dict[str, float]] = {}
    total = {"count": 0, "payload_bytes": 0, "ring_bytes": 0.0}
    for c in collectives:
        entry = summary.setdefault(getattr(c, by), {"count": 0, "payload_bytes": 0, "ring_bytes": 0.0})
        for target in (entry, total):
            target["count"] += 1
            target["payload_bytes"] += c.payload_bytes
            target["ring_bytes"] += c.ring_bytes
    summary["total"] = total
    return summary


class CommCounter:
    """Record every torch.distributed collective called inside the ``with`` block.

    >>> with CommCounter() as counter:
    ...     out = block(x)
    ...     out.sum().backward()
    >>> counter.summary()["all_reduce"]["payload_bytes"]

    The functions of ``torch.distributed`` (and of ``torch.distributed.distributed_c10d``, which
    defines them) are replaced on entry and restored on exit; counters may nest (the inner one's
    calls are recorded by both) but must exit in reverse order of entry. A collective that calls
    another wrapped one internally (``all_gather_into_tensor`` calls ``all_gather_single``) is
    recorded once, as the function the caller called. A call is recorded when it returns (an
    ``async_op`` call when it is issued), so one that raises is not. Calls from every thread are
    recorded (autograd may run backward on its own threads).
    """

    def __init__(self) -> None:
        self.records: list[Collective] = []
        self._lock = threading.Lock()
        self._inside = threading.local()
        self._saved: list[tuple[ModuleType, str, Any]] = []

    # -- the with block --------------------------------------------------------------------------

    def __enter__(self) -> "CommCounter":
        if self._saved:
            raise RuntimeError("this CommCounter is already active")
        wrappers: dict[int, Any] = {}  # one wrapper per original function, shared by the namespaces
        for module in _NAMESPACES:
            for name in _WRAPPED:
                original = getattr(module, name, None)
                if original is None:
                    continue
                if id(original) not in wrappers:
                    wrappers[id(original)] = self._wrap(name, original)
                self._saved.append((module, name, original))
                setattr(module, name, wrappers[id(original)])
        return self

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        kind, payload = _WRAPPED[name]
        signature = inspect.signature(original)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._inside, "depth", 0):  # called by another wrapped collective
                return original(*args, **kwargs)
            self._inside.depth = 1
            try:
                result = original(*args, **kwargs)
            finally:
                self._inside.depth = 0
            arguments = signature.bind(*args, **kwargs).arguments
            group = arguments.get("group")
            tensor = next(iter(t for t in arguments.values() if isinstance(t, torch.Tensor)), None)
            if tensor is None:  # the list forms: their first list's first tensor
                tensor = next(v[0] for v in arguments.values() if isinstance(v, (list, tuple)) and v)
            record = Collective(
                kind=kind,
                payload_bytes=payload(arguments),
                group_size=dist.get_world_size(group),
                op=name,
                dtype=str(tensor.dtype).removeprefix("torch."),
            )
            with self._lock:
                self.records.append(record)
            return result

        counted.__wrapped__ = original  # type: ignore[attr-defined]
        counted.__name__ = name
        return counted

    # -- results ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the calls recorded so far (a counter can be re-entered after it exits)."""
        with self._lock:
            self.records.clear()

    def summary(self, by: str = "kind") -> dict[str, dict[str, float]]:
        """Count, payload bytes and ring bytes per collective kind (``by="op"``: per function), and total."""
        with self._lock:
            return summarise(list(self.records), by)

    @property
    def payload_bytes(self) -> int:
        """Payload bytes of every recorded call."""
        with self._lock:
            return sum(c.payload_bytes for c in self.records)


# ------------------------------------------------------------------------------------------------
# Megatron's analysis for one transformer block


@dataclass(frozen=True)
class BlockComm:
    """The collectives one tensor-parallel transformer block runs per forward and backward pass."""

    forward: tuple[Collective, ...]
    backward: tuple[Collective, ...]

    @property
    def collectives(self) -> tuple[Collective, ...]:
        """Forward then backward, in the order they run."""
        return self.forward + self.backward

    @property
    def activations(self) -> tuple[Collective, ...]:
        """The collectives of Megatron's analysis: those that move activations (or their gradients)."""
        return tuple(c for c in self.collectives if not c.parameters)

    @property
    def parameter_gradients(self) -> tuple[Collective, ...]:
        """The all-reduces of replicated parameters' gradients (sequence parallelism only)."""
        return tuple(c for c in self.collectives if c.parameters)

    @property
    def payload_bytes(self) -> int:
        return sum(c.payload_bytes for c in self.collectives)

    @property
    def ring_bytes(self) -> float:
        """What each rank sends per forward + backward under the ring cost model."""
        return sum(c.ring_bytes for c in self.collectives)

    def summary(self) -> dict[str, dict[str, float]]:
        return summarise(self.collectives)


def predicted_block_comm(
    batch: int, seq_len: int, hidden: int, tp: int, sequence_parallel: bool, bytes_per_element: int
) -> BlockComm:
    """The communication of ONE ``megamm.model.blocks.TransformerBlock`` (attention + MLP), forward
    and backward, in the order it runs.

    Megatron's analysis: every activation collective moves the block's activations,
    ``batch * seq_len * hidden`` elements (the payload, see the module docstring), on the
    tensor-parallel group of ``tp`` ranks:

    - without sequence parallelism, 4 all-reduces: forward, one after the attention's and one after
      the MLP's row-parallel layer (``g``, ``reduce_from_group``); backward, one at each sub-layer's
      column-parallel input (``f``, the conjugate: ``copy_to_group``), the MLP's first;
    - with sequence parallelism, each all-reduce becomes a reduce-scatter plus an all-gather:
      forward, an all-gather into each column-parallel layer (``gather_from_sequence``) and a
      reduce-scatter out of each row-parallel one (``reduce_scatter_to_sequence``); backward, their
      mirror images, in reverse order. The same ring bytes; twice the calls, each moving half.

    Sequence parallelism also sums, in the backward pass, the gradients of the parameters each
    rank holds whole but applies to its slice of the sequence (:attr:`BlockComm.parameter_gradients`):
    per sub-layer, one all-reduce of ``2 * hidden`` elements for its LayerNorm's weight and bias and
    one of ``hidden`` for its row-parallel bias; each sub-layer's runs as its backward begins (the
    bias's) and ends (the norm's). Megatron sums the same gradients (coalesced, once per step).
    Data-parallel traffic is not counted. ``tp == 1`` communicates nothing.
    """
    for name, value in (("batch", batch), ("seq_len", seq_len), ("hidden", hidden), ("tp", tp)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if bytes_per_element < 1:
        raise ValueError(f"bytes_per_element must be >= 1, got {bytes_per_element}")
    if sequence_parallel and seq_len % tp:
        raise ValueError(f"sequence parallelism needs seq_len={seq_len} divisible by tp={tp}")
    if tp == 1:
        return BlockComm((), ())
    size = batch * seq_len * hidden * bytes_per_element

    def c(kind: str, phase: str, where: str) -> Collective:
        return Collective(kind=kind, payload_bytes=size, group_size=tp, op=kind, phase=phase, where=where)

    def grads(*parameters: str) -> Collective:
        numel = hidden * (2 if parameters[0].endswith("norm.weight") else 1)
        return Collective(
            kind=ALL_REDUCE, payload_bytes=numel * bytes_per_element, group_size=tp, op=ALL_REDUCE,
            phase="backward", where="replicated parameters' gradients", parameters=parameters,
        )  # fmt: skip

    if not sequence_parallel:
        forward = (c(ALL_REDUCE, "forward", "attention out (g)"), c(ALL_REDUCE, "forward", "MLP out (g)"))
        backward = (c(ALL_REDUCE, "backward", "MLP in (f)"), c(ALL_REDUCE, "backward", "attention in (f)"))
    else:
        forward = (
            c(ALL_GATHER, "forward", "attention in"), c(REDUCE_SCATTER, "forward", "attention out"),
            c(ALL_GATHER, "forward", "MLP in"), c(REDUCE_SCATTER, "forward", "MLP out"),
        )  # fmt: skip
        backward = (
            grads("mlp.down.bias"),
            c(ALL_GATHER, "backward", "MLP out"), c(REDUCE_SCATTER, "backward", "MLP in"),
            grads("mlp_norm.weight", "mlp_norm.bias"),
            grads("attn.out.bias"),
            c(ALL_GATHER, "backward", "attention out"), c(REDUCE_SCATTER, "backward", "attention in"),
            grads("attn_norm.weight", "attn_norm.bias"),
        )  # fmt: skip
    return BlockComm(forward, backward)


__all__ = [
    "BlockComm",
    "Collective",
    "CommCounter",
    "predicted_block_comm",
    "ring_bytes",
    "summarise",
]
