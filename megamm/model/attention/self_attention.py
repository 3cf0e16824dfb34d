"""Full multi-head self-attention with heads split over the tensor-parallel group."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamm.parallel import ColumnParallelLinear, RowParallelLinear, group_size
from megamm.parallel.layers import InitMethod
from megamm.parallel.mappings import ProcessGroup


class ParallelSelfAttention(nn.Module):
    """Scaled dot-product attention; each rank owns num_heads / tp heads.

    Q, K and V are one stacked column-parallel projection (one matmul), each rank holding
    whole heads of each; the output projection is row-parallel and sums over ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        group: ProcessGroup,
        init_method: InitMethod,
        output_init_method: InitMethod,
    ) -> None:
        super().__init__()
        tp = group_size(group)
        if num_heads % tp != 0:
            raise ValueError(f"num_heads={num_heads} is not divisible by the tensor-parallel size {tp}")
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // tp
        self.qkv = ColumnParallelLinear(hidden_size, 3 * hidden_size, group, init_method=init_method, stacked=3)
        self.out = RowParallelLinear(hidden_size, hidden_size, group, init_method=output_init_method)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, H); key_padding_mask: (B, T) bool, True for real tokens."""
        batch, length, _ = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.local_heads, self.head_dim)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, d)
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, T): True = attend
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, T, d)
        context = context.transpose(1, 2).reshape(batch, length, self.local_heads * self.head_dim)
        return self.out(context)  # (B, T, H)
