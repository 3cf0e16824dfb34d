"""Cross entropy over logits split along the vocabulary on the tensor-parallel group.

A vocab-parallel output layer leaves each tensor-parallel rank with the logits of its own slice of
the vocabulary, ``(..., V / tp)``. Gathering them would materialise ``(..., V)`` on every rank;
instead three all-reduces over the group give the loss: the max (for stability), the sum of
exponentials and the target's logit (each owned by exactly one rank), plus the logits' sum when
label smoothing is on. The backward pass needs no communication: each rank's gradient is its
slice of ``softmax - smoothed one-hot``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from megamm.parallel.mappings import _all_reduce, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup, ignore_index: int, smoothing: float
    ) -> torch.Tensor:
        # logits: (N, V / tp) this rank's vocabulary slice; target: (N,) global token ids.
        local_vocab = logits.shape[-1]
        vocab = local_vocab * group_size(group)
        start = group_rank(group) * local_vocab
        shifted = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp16/bf16 computed in fp32
        peak = _all_reduce(shifted.max(dim=-1).values, group, dist.ReduceOp.MAX)  # (N,)
        shifted = shifted - peak.unsqueeze(-1)  # (N, V / tp), all <= 0 after the global max
        exp = shifted.exp()
        sum_exp = _all_reduce(exp.sum(dim=-1), group)  # (N,)

        ignored = target == ignore_index
        outside = (target < start) | (target >= start + local_vocab) | ignored
        local_target = torch.where(outside, torch.zeros_like(target), target - start)  # (N,)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)  # (N,)
        target_logit = _all_reduce(torch.where(outside, torch.zeros_like(target_logit), target_logit), group)

        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit  # (N,): -log softmax at the target
        if smoothing > 0:
            mean_logit = _all_reduce(shifted.sum(dim=-1), group) / vocab  # (N,)
            loss = (1.0 - smoothing) * loss + smoothing * (log_sum_exp - mean_logit)
        loss = torch.where(ignored, torch.zeros_like(loss), loss)

        softmax = exp / sum_exp.unsqueeze(-1)  # (N, V / tp)
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.smoothing, ctx.vocab, ctx.dtype = smoothing, vocab, logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        softmax, local_target, outside, ignored = ctx.saved_tensors
        grad = softmax  # in place (the saved softmax is not needed again): softmax - (1 - eps) one_hot - eps / V
        rows = torch.arange(grad.shape[0], device=grad.device)
        hit = (~outside).to(grad.dtype)
        grad[rows, local_target] -= (1.0 - ctx.smoothing) * hit
        if ctx.smoothing > 0:
            grad -= ctx.smoothing / ctx.vocab
        grad *= (grad_loss * (~ignored).to(grad.dtype)).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: torch.Tensor,
    target: torch.Tensor,
    *,
    group: ProcessGroup,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """``F.cross_entropy`` of logits split over the vocabulary on ``group``, without gathering them.

    Args:
        logits_shard: ``(..., V / tp)``, this rank's contiguous slice of the vocabulary (rank r holds
            ids ``[r * V / tp, (r + 1) * V / tp)``, as :class:`~megamm.parallel.VocabParallelEmbedding`
            and a column-parallel output layer split them).
        target: ``(...)`` global token ids, identical on every rank of ``group``; ``ignore_index``
            marks positions that count for nothing.
        group: the tensor-parallel group.
        label_smoothing: as in ``F.cross_entropy``: ``(1 - eps) * nll + eps * mean over the vocabulary``.
        reduction: ``"mean"`` over the positions not ignored (``F.cross_entropy``'s), ``"sum"`` or ``"none"``.

    Returns:
        The loss, equal on every rank of ``group``; with ``"none"``, shaped like ``target``.
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits_shard.shape)} and target {tuple(target.shape)} do not match")
    losses = _VocabParallelCrossEntropy.apply(
        logits_shard.reshape(-1, logits_shard.shape[-1]), target.reshape(-1), group, ignore_index, label_smoothing
    )  # (N,)
    if reduction == "none":
        return losses.reshape(target.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (target != ignore_index).sum()


__all__ = ["vocab_parallel_cross_entropy"]
