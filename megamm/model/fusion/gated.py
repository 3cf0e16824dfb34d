"""Gated cross-attention blocks (Flamingo, Alayrac et al. 2022): a stream reads another
modality's tokens through tanh-gated residual branches whose gates start at 0, so inserting the
blocks into a trained stream leaves it unchanged until the gates learn to open."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megamm.model.blocks import (
    ParallelMLP,
    SequenceLayout,
    SequenceParallelLayerNorm,
    hidden_dropout,
    residual_cross_attention,
)
from megamm.model.init import WeightInit
from megamm.parallel.mappings import ProcessGroup


def gated_positions(num_layers: int, every: int) -> tuple[int, ...]:
    """Where gated cross-attention blocks go in a stream of ``num_layers`` layers: after every
    ``every``-th layer, as 0-based indices of the layers they follow.

    ``gated_positions(6, 2) == (1, 3, 5)``: blocks after layers 2, 4 and 6 (counting from 1);
    ``gated_positions(6, 1)``: after every layer.
    """
    if num_layers < 1:
        raise ValueError(f"gated_positions: num_layers={num_layers} must be at least 1")
    if every < 1:
        raise ValueError(
            f"gated_positions: every={every} must be at least 1 (1: a gated block after every layer); "
            "to fuse nothing, choose no gated cross-attention fusion"
        )
    if every > num_layers:
        raise ValueError(
            f"gated_positions: every={every} exceeds num_layers={num_layers}, so no gated block would be "
            f"inserted; choose every <= {num_layers}"
        )
    return tuple(index for index in range(num_layers) if (index + 1) % every == 0)


class GatedCrossAttentionBlock(nn.Module):
    """Flamingo's gated cross-attention dense block: (B, T, H) -> (B, T, H),

        x = x + tanh(attn_gate) * cross_attn(ln(x), context, context_mask)
        x = x + tanh(mlp_gate) * mlp(ln(x))

    with ``attn_gate`` and ``mlp_gate`` learned scalars (shape (1,): DeepSpeed rejects 0-dim
    parameters) initialised at 0: a new block is the identity, and its gates still get gradients.

    The context (B, Tk, Hc) may have another width than the stream; ``context_mask`` (B, Tk) or
    (1, Tk) bool (True = real context token) pads it. A row whose context is entirely missing
    (every key masked) is left exactly as it came in, both branches skipped (selected away by
    ``torch.where``, with the computation still run on every row, so every rank runs the same
    collectives whatever its batch holds). Padded context positions are replaced by zeros before
    the projections, so whatever they hold (even NaN) changes neither outputs nor gradients.

    Tensor parallelism: heads of the cross-attention (:class:`~megamm.model.attention.ParallelCrossAttention`) and the
    MLP's hidden units (:class:`ParallelMLP`) are split over ``group``; norms and gates are
    replicated. Every weight is drawn in the random stream of the piece ``name``
    (:meth:`WeightInit.seeded`) as a full master weight, so any tensor-parallel size gives the same
    block. The stream is whole on every rank (no sequence parallelism: cross-attention has none).

    ``num_layers``: the depth the residual outputs' initialisation is scaled for
    (:meth:`WeightInit.residual`), normally the stream's. ``dropout`` drops both branches' outputs
    before the gates, ``attention_dropout`` the attention probabilities (training only).
    """

    def __init__(
        self,
        name: str,
        hidden_size: int,
        context_size: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        num_layers: int = 1,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layout = SequenceLayout(group, sequence_parallel=False)
        self.dropout = dropout
        with init.seeded(name):
            self.attn_norm = SequenceParallelLayerNorm(hidden_size)
            self.attn = residual_cross_attention(
                hidden_size, context_size, num_heads, group, init, num_layers, attention_dropout
            )
            self.mlp_norm = SequenceParallelLayerNorm(hidden_size)
            self.mlp = ParallelMLP(hidden_size, ffn_size, group, init, num_layers)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # (1,): tanh(0) = 0, the block starts closed
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x (B, T, H), context (B, Tk, Hc), context_mask (B, Tk) or (1, Tk) bool (True = real
        context token; None: all real) -> (B, T, H); rows without any real context token: x."""
        if x.dim() != 3 or context.dim() != 3:
            raise ValueError(
                f"GatedCrossAttentionBlock: x must be (B, T, H) and context (B, Tk, Hc), "
                f"got {tuple(x.shape)} and {tuple(context.shape)}"
            )
        if context_mask is not None:  # padded context: zeros, inert in values and gradients even if NaN
            context = torch.where(context_mask[:, :, None], context, 0.0)  # (B, Tk, Hc)
        attended = self.attn(self.attn_norm(x), context, context_mask)  # (B, T, H)
        attended = hidden_dropout(attended, self.dropout, self.training, self.layout)
        out = x + torch.tanh(self.attn_gate) * attended  # (B, T, H)
        dense = hidden_dropout(self.mlp(self.mlp_norm(out)), self.dropout, self.training, self.layout)  # (B, T, H)
        out = out + torch.tanh(self.mlp_gate) * dense  # (B, T, H)
        if context_mask is None:
            return out
        has_context = context_mask.any(dim=1).expand(x.shape[0])  # (B,)
        return torch.where(has_context[:, None, None], out, x)  # (B, T, H): contextless rows unchanged

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}" if self.dropout else ""
