"""Autograd functions pairing a forward collective with its backward.

Every public wrapper takes the process group explicitly; ``group=None`` or a group of size 1
makes it the identity, so layers run unchanged in a single process.

==========================  ================================  =============================
wrapper                     forward                           backward
==========================  ================================  =============================
copy_to_group               identity                          all-reduce (sum)
reduce_from_group           all-reduce (sum)                  identity
scatter_to_group            keep this rank's last-dim slice   all-gather along last dim
gather_from_group           all-gather along last dim         keep this rank's slice
gather_batch_with_grad      all-gather along dim 0            all-reduce, keep own rows
==========================  ================================  =============================
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


def _all_reduce(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    if group_size(group) == 1:
        return tensor
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, group=group)
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


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _split(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather(grad, ctx.group, dim=-1), None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _split(grad, ctx.group, dim=-1), None


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


def reduce_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward."""
    return _ReduceFromGroup.apply(x, group) if group_size(group) > 1 else x


def scatter_to_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; the gradient is all-gathered."""
    return _ScatterToGroup.apply(x, group) if group_size(group) > 1 else x


def gather_from_group(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's slice along the last dimension; the gradient is split."""
    return _GatherFromGroup.apply(x, group) if group_size(group) > 1 else x


def gather_batch_with_grad(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-gather rows (dim 0) from every rank, keeping the autograd graph across ranks.

    (B, ...) -> (group_size * B, ...). The backward sums every rank's gradient for our rows,
    which makes a loss computed from the gathered tensor on each rank equal to the naive
    global loss once data-parallel gradients are averaged.
    """
    return _GatherBatchWithGrad.apply(x, group) if group_size(group) > 1 else x
