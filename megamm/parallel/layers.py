"""Tensor-parallel layers (Megatron-style), initialised from the full master weight.

Each layer materialises the full (unsharded) weight, runs ``init_method`` on it, and keeps
this rank's slice. Since every rank draws the same numbers from the same seed, a model built
with tensor_parallel=N is exactly the tensor_parallel=1 model split up.

Sharded parameters carry ``tensor_model_parallel=True`` (and ``partition_dim``) so DeepSpeed
counts them once per rank when it computes the global gradient norm.

With ``sequence_parallel=True`` the column- and row-parallel layers take and give Megatron's
sequence-parallel layout, batch-first: the column-parallel layer's input is this rank's slice of
the sequence, ``(B, T / tp, in)``, which it all-gathers (``gather_from_sequence``) instead of
entering through ``copy_to_group``; the row-parallel layer reduce-scatters its partial output back
to the slices (``reduce_scatter_to_sequence``) instead of all-reducing it. A replicated parameter
applied to a slice of the sequence (the row-parallel bias) gets only that slice's share of its
gradient; it enters the computation through ``copy_to_group``, whose backward sums the shares over
the group, and carries ``sequence_parallel=True``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamm.parallel.mappings import (
    ProcessGroup,
    copy_to_group,
    gather_from_group,
    gather_from_sequence,
    group_rank,
    group_size,
    reduce_from_group,
    reduce_scatter_to_sequence,
    scatter_to_group,
)

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float) -> InitMethod:
    """In-place N(0, std^2) initialisation."""

    def init(tensor: torch.Tensor) -> None:
        nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


def shard_of(full: torch.Tensor, rank: int, size: int, dim: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s slice (of ``size``) of the unsharded tensor ``full`` along ``dim``.

    With ``stride`` > 1, ``full`` is ``stride`` equal blocks along ``dim`` (say Q, K, V); each
    block is sliced separately and the rank keeps its slice of every block, in order. This is
    how every sharded parameter relates to its full weight (``partition_dim``, ``partition_stride``).
    """
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in blocks], dim=dim).contiguous()


def _sharded_parameter(master: torch.Tensor, group: ProcessGroup, dim: int, stride: int = 1) -> nn.Parameter:
    """This rank's :func:`shard_of` ``master``, as a parameter marked as sharded."""
    size = group_size(group)
    param = nn.Parameter(shard_of(master, group_rank(group), size, dim, stride))
    param.tensor_model_parallel = size > 1  # type: ignore[attr-defined]
    param.partition_dim = dim  # type: ignore[attr-defined]
    param.partition_stride = stride  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by rows (output features) over the group.

    Input (..., in_features), replicated on every rank.
    Output (..., out_features / tp) per rank, or (..., out_features) if ``gather_output``.

    With ``sequence_parallel`` (Megatron's sequence parallelism): input (B, T / tp, in_features),
    this rank's slice of the sequence, all-gathered along the sequence before the matmul (its
    gradient reduce-scattered back); output (B, T, out_features / tp).

    ``stacked`` > 1 fuses that many projections of ``out_features / stacked`` each (Q, K and V:
    one matmul instead of three). Each is initialised from its own master weight, drawn in
    order, and split over the group on its own, so a rank's output is its slice of the first
    projection, then of the second, and so on: ``output.chunk(stacked, dim=-1)`` separates them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: ProcessGroup,
        bias: bool = True,
        gather_output: bool = False,
        init_method: InitMethod = normal_init(0.02),
        device: Optional[torch.device] = None,
        stacked: int = 1,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if stacked > 1 and gather_output:
            raise ValueError("a stacked ColumnParallelLinear cannot gather its output")
        if sequence_parallel and gather_output:
            raise ValueError("a sequence-parallel ColumnParallelLinear cannot gather its output")
        self.group = group
        self.sequence_parallel = sequence_parallel
        self.in_features = in_features
        self.out_features = out_features
        self.gather_output = gather_output
        part = _divide(out_features, stacked, "out_features / stacked")
        what = "out_features" if stacked == 1 else "out_features / stacked"
        self.out_per_rank = stacked * _divide(part, group_size(group), what)
        masters = [torch.empty(part, in_features, device=device) for _ in range(stacked)]
        for master in masters:
            init_method(master)
        self.weight = _sharded_parameter(torch.cat(masters), group, dim=0, stride=stacked)
        if bias:
            self.bias: Optional[nn.Parameter] = _sharded_parameter(
                torch.zeros(out_features, device=device), group, dim=0, stride=stacked
            )
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence(x, self.group)  # (B, T / tp, in) -> (B, T, in)
        else:
            x = copy_to_group(x, self.group)  # (..., in)
        y = F.linear(x, self.weight, self.bias)  # (..., out / tp)
        return gather_from_group(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, out_per_rank={self.out_per_rank}"


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by columns (input features) over the group.

    Input (..., in_features / tp) per rank if ``input_is_parallel``, else (..., in_features).
    Output (..., out_features), summed over the group and replicated on every rank.

    With ``sequence_parallel``: input (B, T, in_features / tp); the partial outputs are
    reduce-scattered along the sequence, so the output is this rank's slice (B, T / tp,
    out_features). The bias, added to that slice, is replicated but gets only the slice's share of
    its gradient: it enters through ``copy_to_group`` (gradient summed over the group) and is
    marked ``sequence_parallel=True``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: ProcessGroup,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_method: InitMethod = normal_init(0.02),
        device: Optional[torch.device] = None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel RowParallelLinear needs input_is_parallel=True")
        self.group = group
        self.in_features = in_features
        self.out_features = out_features
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.in_per_rank = _divide(in_features, group_size(group), "in_features")
        master = torch.empty(out_features, in_features, device=device)
        init_method(master)
        self.weight = _sharded_parameter(master, group, dim=1)
        if bias:
            # Added after the reduction, so it is replicated, not sharded.
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(out_features, device=device))
            self.bias.sequence_parallel = sequence_parallel and group_size(group) > 1  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_group(x, self.group)  # (..., in / tp)
        partial = F.linear(x, self.weight)  # (..., out), this rank's share of the sum
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence(partial, self.group)  # (B, T, out) -> (B, T / tp, out), summed
            bias = copy_to_group(self.bias, self.group) if self.bias is not None else None  # gradient: summed
        else:
            y = reduce_from_group(partial, self.group)  # (..., out)
            bias = self.bias
        return y + bias if bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, in_per_rank={self.in_per_rank}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows over the group.

    Input ids (...), replicated, each in ``[0, num_embeddings)`` (checked at every TP size).
    Output (..., embedding_dim), replicated: each rank looks up the ids in its vocabulary range,
    zeroes the rest, and the group sums the results.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        group: ProcessGroup,
        init_method: InitMethod = normal_init(0.02),
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.group = group
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        per_rank = _divide(num_embeddings, group_size(group), "num_embeddings")
        self.vocab_start = group_rank(group) * per_rank
        self.vocab_end = self.vocab_start + per_rank
        master = torch.empty(num_embeddings, embedding_dim, device=device)
        init_method(master)
        self.weight = _sharded_parameter(master, group, dim=0)

    def _id_error(self) -> str:
        return (
            f"VocabParallelEmbedding: token ids must be in [0, {self.num_embeddings}); check the "
            "tokenizer against model.text.vocab_size"
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., embedding_dim), alike on every rank."""
        # A bad id fails at every TP size. At TP = 1 the lookup checks its indices itself, as
        # nn.Embedding's does (an IndexError on the CPU, renamed here; a device-side assert on GPUs),
        # so nothing is added to it. At TP > 1 :meth:`partial` checks first.
        if group_size(self.group) == 1:
            try:
                return F.embedding(ids, self.weight)
            except IndexError as error:
                raise RuntimeError(self._id_error()) from error
        return reduce_from_group(self.partial(ids), self.group)

    def partial(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of the lookup, ids (...) -> (..., embedding_dim): the rows of the ids in
        its vocabulary range, zeros for the others. Summed over the group it is the embedding: under
        sequence parallelism a reduce-scatter along the sequence sums it straight into the slices.
        At TP = 1, the whole lookup."""
        if group_size(self.group) == 1:
            return self(ids)
        # Masking would silently turn a bad id into a zero vector: a device-side assert checks
        # first (no host sync on GPUs).
        torch._assert_async(((ids >= 0) & (ids < self.num_embeddings)).all(), self._id_error())
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight)  # (..., D), zero rows for foreign ids below
        return out.masked_fill(outside.unsqueeze(-1), 0.0)
