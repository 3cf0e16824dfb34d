"""Autograd functions pairing a forward collective with its backward.

Every public wrapper takes the process group explicitly; ``group=None`` or a group of size 1
makes it the identity, so layers run unchanged in a single process.

==========================  ================================  =============================
wrapper                     forward                           backward
==========================  ================================  =============================
copy_to_group               identity                          all-reduce (sum)
copy_all_to_group           identity, of several tensors      one all-reduce of them all
reduce_from_group           all-reduce (sum)                  identity
scatter_to_group            keep this rank's last-dim slice   all-gather along last dim
gather_from_group           all-gather along last dim         keep this rank's slice
gather_batch_with_grad      all-gather along dim 0            all-reduce, keep own rows
scatter_to_sequence         keep this rank's sequence slice   all-gather along the sequence
gather_from_sequence        all-gather along the sequence     reduce-scatter along it
reduce_scatter_to_sequence  reduce-scatter along the sequence all-gather along it
==========================  ================================  =============================

The last three are Megatron's sequence parallelism: outside the tensor-parallel regions (norms,
dropout, residuals) each rank holds a slice of the sequence; ``gather_from_sequence`` enters a
column-parallel layer with the whole sequence, and ``reduce_scatter_to_sequence`` leaves a
row-parallel one, summing the ranks' partial outputs and keeping this rank's slice. The
sequence is dimension 1 of batch-first ``(B, T, ...)`` tensors unless ``dim`` says otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]


def group_size(group: ProcessGroup) -> int:
    """World size of ``group``; 1 when there is no group or torch.distributed is off."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def _all_reduce(tensor: torch.Tensor, group: ProcessGroup, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) == 1:
        return tensor
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _all_gather(tensor: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=dim)


def _split(tensor: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return tensor
    if tensor.shape[dim] % size != 0:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} is not divisible by group size {size}")
    return tensor.chunk(size, dim=dim)[group_rank(group)].contiguous()


def _reduce_scatter(tensor: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Sum ``tensor`` over the group and keep this rank's slice of dimension ``dim``."""
    size = group_size(group)
    if size == 1:
        return tensor
    if tensor.shape[dim] % size != 0:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} is not divisible by group size {size}")
    parts = [part.contiguous() for part in tensor.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad.clone(), ctx.group), None


class _CopyAllToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group: ProcessGroup, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        return tensors

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        present = [g for g in grads if g is not None]
        if not present:
            return (None, *grads)
        flat = _all_reduce(torch.cat([g.reshape(-1) for g in present]), ctx.group)  # one call for all
        summed = iter(flat.split([g.numel() for g in present]))
        return (None, *(next(summed).view_as(g) if g is not None else None for g in grads))


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, dim: int, reduce_grad: bool) -> torch.Tensor:
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each rank's gradient of the gathered tensor is partial when the ranks go on to compute
        # different parts (a column-parallel layer): sum them while splitting.
        kept = _reduce_scatter(grad, ctx.group, ctx.dim) if ctx.reduce_grad else _split(grad, ctx.group, ctx.dim)
        return kept, None, None, None


class _ReduceScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherBatchWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        ctx.rows = x.shape[0]
        return _all_gather(x, group, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss depends on every rank's rows: sum the contributions, keep ours.
        # Rows may differ per rank only if callers pad; we require equal local batch sizes.
        summed = _all_reduce(grad.contiguous().clone(), ctx.group)
        start = group_rank(ctx.group) * ctx.rows
        return summed[start : start + ctx.rows], None


def copy_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient."""
    return _CopyToGroup.apply(x, group) if group_size(group) > 1 else x


def copy_all_to_group(tensors: tuple[torch.Tensor, ...], group: ProcessGroup) -> tuple[torch.Tensor, ...]:
    """:func:`copy_to_group` of several tensors at once: their gradients are summed over the group
    in ONE all-reduce (of their concatenation) instead of one each. For small replicated parameters
    used together (a LayerNorm's weight and bias under sequence parallelism)."""
    if group_size(group) == 1:
        return tuple(tensors)
    return _CopyAllToGroup.apply(group, *tensors)


def reduce_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward."""
    return _ReduceFromGroup.apply(x, group) if group_size(group) > 1 else x


def scatter_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; the gradient is all-gathered."""
    return _ScatterToGroup.apply(x, group, -1) if group_size(group) > 1 else x


def gather_from_group(x: torch.Tensor, group: ProcessGroup, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's slice along ``dim`` (the last by default); the gradient is split
    (each rank keeps its slice of a gradient that is whole and alike on every rank)."""
    return _GatherFromGroup.apply(x, group, dim, False) if group_size(group) > 1 else x


def scatter_to_sequence(x: torch.Tensor, group: ProcessGroup, dim: int = 1) -> torch.Tensor:
    """Enter sequence parallelism: (B, T, ...) -> (B, T / tp, ...), this rank's slice of the
    sequence; the gradient is all-gathered."""
    return _ScatterToGroup.apply(x, group, dim) if group_size(group) > 1 else x


def gather_from_sequence(x: torch.Tensor, group: ProcessGroup, dim: int = 1) -> torch.Tensor:
    """Before a column-parallel layer: (B, T / tp, ...) -> (B, T, ...), every rank's slice of the
    sequence; the gradient (partial on each rank) is reduce-scattered back to the slices."""
    return _GatherFromGroup.apply(x, group, dim, True) if group_size(group) > 1 else x


def reduce_scatter_to_sequence(x: torch.Tensor, group: ProcessGroup, dim: int = 1) -> torch.Tensor:
    """After a row-parallel layer: sum the ranks' partial (B, T, ...) outputs and keep this rank's
    slice of the sequence, (B, T / tp, ...); the gradient is all-gathered."""
    return _ReduceScatterToGroup.apply(x, group, dim) if group_size(group) > 1 else x


def gather_batch_with_grad(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-gather rows (dim 0) from every rank, keeping the autograd graph across ranks.

    (B, ...) -> (group_size * B, ...). The backward sums every rank's gradient for our rows,
    which makes a loss computed from the gathered tensor on each rank equal to the naive
    global loss once data-parallel gradients are averaged.
    """
    return _GatherBatchWithGrad.apply(x, group) if group_size(group) > 1 else x
