"""Cross-modal attention: queries from one stream, keys and values from another, heads split over
the tensor-parallel group."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from megamm.model.attention.core import AttentionKernel, as_kernel
from megamm.model.attention.self_attention import tensor_parallel_rng
from megamm.parallel import ColumnParallelLinear, RowParallelLinear, group_size
from megamm.parallel.layers import InitMethod
from megamm.parallel.mappings import ProcessGroup


class ParallelCrossAttention(nn.Module):
    """Multi-head attention of x (B, Tq, H) over a context (B, Tk, Hc); each rank owns
    num_heads / tp heads.

    The query projection (H -> H) and the stacked key/value projection (Hc -> 2 H, one matmul,
    K and V each split over the group by heads) are column-parallel; the output projection
    (H -> H) is row-parallel and sums over ranks. The two streams' widths may differ:
    ``context_init_method`` (default ``init_method``) initialises the key/value projection, which
    reads Hc features (with fan-in initialisation, pass ``init.linear(context_size)``).

    ``key_padding_mask`` (B, Tk) or (1, Tk) bool, True = real context token. ``kernel``: ``"full"``
    (default) or ``"linear"`` (by name with ``kernel_options``, or built); the banded kernels need
    aligned positions and are for self-attention. ``attention_dropout`` drops attention
    probabilities in training, from this rank's own random stream. No sequence parallelism, no
    causal mask, no rotary positions: the two streams share no position axis.
    """

    def __init__(
        self,
        hidden_size: int,
        context_size: int,
        num_heads: int,
        group: ProcessGroup,
        init_method: InitMethod,
        output_init_method: InitMethod,
        context_init_method: Optional[InitMethod] = None,
        attention_dropout: float = 0.0,
        kernel: Union[str, AttentionKernel, None] = None,
        kernel_options: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        tp = group_size(group)
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if num_heads % tp != 0:
            raise ValueError(f"num_heads={num_heads} is not divisible by the tensor-parallel size {tp}")
        self.group = group
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // tp
        self.attention_dropout = attention_dropout
        self.kernel = as_kernel(kernel, kernel_options, self.head_dim)
        if not self.kernel.supports_cross:
            raise ValueError(
                f"ParallelCrossAttention: the {self.kernel.name} kernel needs queries and keys on one position "
                "axis; use kernel='full' or kernel='linear'"
            )
        if attention_dropout > 0 and not self.kernel.has_probabilities:
            raise ValueError(
                f"ParallelCrossAttention: the {self.kernel.name} kernel has no attention probabilities to drop; "
                "set attention_dropout=0"
            )
        self.q = ColumnParallelLinear(hidden_size, hidden_size, group, init_method=init_method)
        self.kv = ColumnParallelLinear(
            context_size, 2 * hidden_size, group, init_method=context_init_method or init_method, stacked=2
        )
        self.out = RowParallelLinear(hidden_size, hidden_size, group, init_method=output_init_method)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x (B, Tq, H), context (B, Tk, Hc), key_padding_mask (B, Tk) or (1, Tk) bool
        (True = real context token) -> (B, Tq, H)."""
        if x.shape[0] != context.shape[0]:
            raise ValueError(f"x {tuple(x.shape)} and context {tuple(context.shape)} must share the batch size")
        batch, queries, _ = x.shape
        keys = context.shape[1]
        q = self.q(x).view(batch, queries, self.local_heads, self.head_dim).transpose(1, 2)  # (B, h, Tq, d)
        kv = self.kv(context).view(batch, keys, 2, self.local_heads, self.head_dim)  # (B, Tk, 2, h, d)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, Tk, d)
        if self.training and self.attention_dropout > 0:
            with tensor_parallel_rng(self.group):  # this rank's heads: its own masks
                attended = self.kernel(q, k, v, key_padding_mask, dropout_p=self.attention_dropout)  # (B, h, Tq, d)
        else:
            attended = self.kernel(q, k, v, key_padding_mask)  # (B, h, Tq, d)
        attended = attended.transpose(1, 2).reshape(batch, queries, self.local_heads * self.head_dim)  # (B, Tq, h d)
        return self.out(attended)  # (B, Tq, H)
