"""Transformer building blocks: tensor-parallel MLP and pre-norm transformer block."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megamm.model.attention import ParallelSelfAttention
from megamm.model.init import WeightInit
from megamm.parallel import ColumnParallelLinear, RowParallelLinear, checkpoint
from megamm.parallel.mappings import ProcessGroup


class ParallelMLP(nn.Module):
    """Column-parallel up projection, GELU, row-parallel down projection.

    (..., H) -> (..., F / tp) on each rank -> (..., H) summed over the group.
    """

    def __init__(self, hidden_size: int, ffn_size: int, group: ProcessGroup, init: WeightInit, num_layers: int) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(hidden_size, ffn_size, group, init_method=init.linear(hidden_size))
        self.down = RowParallelLinear(ffn_size, hidden_size, group, init_method=init.residual(ffn_size, num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x)). (B, T, H) -> (B, T, H)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        num_layers: int,
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden_size)
        self.attn = ParallelSelfAttention(
            hidden_size,
            num_heads,
            group,
            init_method=init.linear(hidden_size),
            output_init_method=init.residual(hidden_size, num_layers),
        )
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = ParallelMLP(hidden_size, ffn_size, group, init, num_layers)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), key_padding_mask)
        return x + self.mlp(self.mlp_norm(x))


class TransformerStack(nn.Module):
    """``num_layers`` blocks followed by a final LayerNorm.

    Block ``i`` draws its weights in the random stream of the piece ``"{name}.block.{i}"``
    (:meth:`WeightInit.seeded`), as the pipeline's layers do.

    With ``activation_checkpointing`` on, training keeps only each block's input and recomputes
    the block in the backward pass (:func:`megamm.parallel.checkpoint`, which replays the random
    streams), trading one more forward pass for the activations' memory.
    """

    def __init__(
        self,
        name: str,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
    ) -> None:
        super().__init__()
        blocks = []
        for index in range(num_layers):
            with init.seeded(f"{name}.block.{index}"):
                blocks.append(TransformerBlock(hidden_size, num_heads, ffn_size, group, init, num_layers))
        self.layers = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(hidden_size)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, key_padding_mask) if recompute else layer(x, key_padding_mask)
        return self.final_norm(x)
