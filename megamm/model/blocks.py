"""Transformer building blocks: tensor-parallel MLP and pre-norm transformer block.

Sequence parallelism (Megatron's, ``parallel.sequence_parallel``): between the tensor-parallel
regions (attention, MLP) each rank of a tensor-parallel group holds a slice of the sequence,
(B, T / tp, H). LayerNorms, dropout and residual additions run on that slice; the column-parallel
layers all-gather the sequence on the way in and the row-parallel layers reduce-scatter it on the
way out. :class:`SequenceLayout` enters that layout after an embedding (padding the sequence to a
multiple of tp with positions that attention ignores), and the encoders' pooling reads it.

Parameters that every rank holds whole but applies to its own slice of the sequence (the
LayerNorms' weights and biases, the row-parallel layers' biases) get only that slice's share of
their gradient. They enter the computation through ``copy_to_group`` (identity forward, gradient
all-reduced over the tensor-parallel group; a LayerNorm's weight and bias together, in one call), so by the time autograd accumulates into ``.grad``
the gradient is the whole sequence's, the same on every rank, and DeepSpeed averages it over the
data-parallel ranks as any other. Being part of the autograd graph, this works with every ZeRO
stage, with the pipeline engine and with activation checkpointing (the recomputation repeats it).
Such parameters carry ``sequence_parallel=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from megamm.config import TransformerConfig
from megamm.model.attention import ParallelCrossAttention, ParallelSelfAttention
from megamm.model.attention.self_attention import tensor_parallel_rng
from megamm.model.init import WeightInit
from megamm.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    checkpoint,
    copy_all_to_group,
    gather_from_group,
    group_rank,
    group_size,
    reduce_from_group,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
)
from megamm.parallel.mappings import ProcessGroup


@dataclass(frozen=True)
class SequenceLayout:
    """How a stream lies between the tensor-parallel regions: whole on every rank, or (under
    sequence parallelism at tp > 1, :attr:`active`) this rank's slice of a sequence padded to a
    multiple of tp."""

    group: ProcessGroup = None
    sequence_parallel: bool = False

    @property
    def active(self) -> bool:
        """True when the stream is split along the sequence (sequence parallelism at tp > 1)."""
        return self.sequence_parallel and group_size(self.group) > 1

    @property
    def size(self) -> int:
        """How many slices the sequence is cut into (1: whole)."""
        return group_size(self.group) if self.active else 1

    def padded_length(self, length: int) -> int:
        """``length`` rounded up to a multiple of :attr:`size`."""
        return -(-length // self.size) * self.size

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Enter the layout: (B, T, H), alike on every rank -> (B, T' / tp, H), this rank's slice of
        the sequence zero-padded to T' = :meth:`padded_length` (T); the gradient is all-gathered.
        The identity when not :attr:`active`."""
        if not self.active:
            return x
        pad = self.padded_length(x.shape[1]) - x.shape[1]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # (B, T', H)
        return scatter_to_sequence(x, self.group)  # (B, T' / tp, H)

    def reduce_scatter(self, partial: torch.Tensor) -> torch.Tensor:
        """Enter the layout from the ranks' partial sums (B, T, H) (a vocabulary-parallel lookup's):
        their sum, this rank's slice of it zero-padded as :meth:`scatter` does, (B, T' / tp, H), in
        one reduce-scatter; the gradient is all-gathered. The group's all-reduce when not
        :attr:`active`."""
        if not self.active:
            return reduce_from_group(partial, self.group)
        pad = self.padded_length(partial.shape[1]) - partial.shape[1]
        if pad:
            partial = F.pad(partial, (0, 0, 0, pad))  # (B, T', H)
        return reduce_scatter_to_sequence(partial, self.group)  # (B, T' / tp, H)

    def pad_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A key padding mask (B, T) bool (True = real token) extended to (B, T') with False."""
        pad = self.padded_length(mask.shape[1]) - mask.shape[1]
        return F.pad(mask, (0, pad), value=False) if pad else mask

    def padding_mask(self, length: int, device: torch.device) -> Optional[torch.Tensor]:
        """The key mask (1, T') of a stream of ``length`` real positions and no padding mask of its
        own (the image stream); None when nothing was padded."""
        padded = self.padded_length(length)
        if padded == length:
            return None
        return (torch.arange(padded, device=device) < length)[None, :]  # (1, T'): True = real

    def gather(self, x: torch.Tensor, length: int) -> torch.Tensor:
        """Leave the layout: this rank's slice (B, T' / tp, H) -> the whole sequence (B, length, H),
        alike on every rank, for layers that need every position (cross-attention, fusion); the
        gradient, whole on every rank, is split back into the slices. The identity when not
        :attr:`active`."""
        if not self.active:
            return x
        return gather_from_group(x, self.group, dim=1)[:, :length]  # (B, length, H)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of dimension 1 of ``tensor`` (B, T', ...), without autograd (a mask)."""
        if not self.active:
            return tensor
        return tensor.chunk(self.size, dim=1)[group_rank(self.group)]


@dataclass(frozen=True)
class BlockAttention:
    """What a block's self-attention runs: a kernel by name (``megamm.model.attention``) with its
    options, causal or not, with rotary positions or not."""

    kernel: str = "full"
    options: Mapping[str, Any] = field(default_factory=dict)
    causal: bool = False
    rotary: bool = False


@dataclass
class EncoderOutput:
    """What an encoder gives: its pooled features, and on request its token features."""

    pooled: torch.Tensor
    """(B, H), alike on every tensor-parallel rank."""
    tokens: Optional[torch.Tensor] = None
    """(B, N, H): every token, whole on every rank (gathered under sequence parallelism, its padding
    cut); None unless asked for."""
    mask: Optional[torch.Tensor] = None
    """(B, N) bool, True = real token; None: every token is real."""


def tower_attention(tower: TransformerConfig) -> list[BlockAttention]:
    """Each block's :class:`BlockAttention` of the tower ``tower`` configures: its ``attention``
    kernels, and for a tower that has them (the text tower) ``causal`` and rotary ``positions``."""
    causal = bool(getattr(tower, "causal", False))
    rotary = getattr(tower, "positions", "learned") == "rotary"
    return [
        BlockAttention(kind, tower.attention.options(kind), causal, rotary)
        for kind in tower.attention.kinds(tower.num_layers)
    ]


def hidden_dropout(x: torch.Tensor, p: float, training: bool, layout: SequenceLayout) -> torch.Tensor:
    """Dropout of the hidden states (embeddings, attention and MLP outputs), as in Megatron: from the
    random stream the tensor-parallel ranks share when they hold the same activations, from each
    rank's own (:func:`tensor_parallel_rng`) when each holds its slice of the sequence."""
    if not training or p == 0:
        return x
    if layout.active:
        with tensor_parallel_rng(layout.group):
            return F.dropout(x, p, training=True)
    return F.dropout(x, p, training=True)


class SequenceParallelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same state dict) that may run on slices of the sequence.

    With ``sequence_parallel`` at tp > 1 the weight and bias enter through ``copy_all_to_group`` (a
    copy of them, so that autograd saves no alias of a parameter ZeRO-3 may release), whose backward
    sums every rank's share of their gradients over the tensor-parallel group, both in one
    all-reduce of 2 x hidden elements.
    """

    def __init__(self, hidden_size: int, group: ProcessGroup = None, sequence_parallel: bool = False) -> None:
        super().__init__(hidden_size)
        self.group = group if sequence_parallel and group_size(group) > 1 else None
        for param in (self.weight, self.bias):
            param.sequence_parallel = self.group is not None  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return super().forward(x)
        # gradients: summed over the group, weight and bias in one all-reduce
        weight, bias = copy_all_to_group((self.weight.clone(), self.bias.clone()), self.group)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def residual_cross_attention(
    hidden_size: int,
    context_size: int,
    num_heads: int,
    group: ProcessGroup,
    init: WeightInit,
    num_layers: int,
    attention_dropout: float = 0.0,
) -> ParallelCrossAttention:
    """Cross-attention from a stream of width ``hidden_size`` to a context of ``context_size``,
    as a residual branch of a stack of ``num_layers`` blocks: queries, keys and values drawn
    fan-in scaled (:meth:`WeightInit.linear`), the output scaled for the depth
    (:meth:`WeightInit.residual`), as the blocks' self-attention and MLP are."""
    return ParallelCrossAttention(
        hidden_size,
        context_size,
        num_heads,
        group,
        init_method=init.linear(hidden_size),
        output_init_method=init.residual(hidden_size, num_layers),
        context_init_method=init.linear(context_size),
        attention_dropout=attention_dropout,
    )


class ParallelMLP(nn.Module):
    """Column-parallel up projection, GELU, row-parallel down projection.

    (..., H) -> (..., F / tp) on each rank -> (..., H) summed over the group; under sequence
    parallelism (B, T / tp, H) -> (B, T, F / tp) -> (B, T / tp, H).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        num_layers: int,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(
            hidden_size, ffn_size, group, init_method=init.linear(hidden_size), sequence_parallel=sequence_parallel
        )
        self.down = RowParallelLinear(
            ffn_size, hidden_size, group, init_method=init.residual(ffn_size, num_layers), sequence_parallel=sequence_parallel
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + dropout(attn(ln(x))), then x + dropout(mlp(ln(x))). (B, T, H) -> (B, T, H),
    or (B, T / tp, H) -> (B, T / tp, H) under sequence parallelism (``sequence_parallel`` at tp > 1).

    ``dropout`` drops the attention and MLP outputs before the residual additions, ``attention_dropout``
    the attention probabilities (both only in training; see :func:`hidden_dropout`). ``attention``:
    the self-attention's kernel, causality and rotary positions (default: full, bidirectional).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        num_layers: int,
        sequence_parallel: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention: Optional[BlockAttention] = None,
    ) -> None:
        super().__init__()
        attention = attention or BlockAttention()
        self.layout = SequenceLayout(group, sequence_parallel)
        self.dropout = dropout
        sp = self.layout.active
        self.attn_norm = SequenceParallelLayerNorm(hidden_size, group, sp)
        self.attn = ParallelSelfAttention(
            hidden_size,
            num_heads,
            group,
            init_method=init.linear(hidden_size),
            output_init_method=init.residual(hidden_size, num_layers),
            sequence_parallel=sp,
            attention_dropout=attention_dropout,
            kernel=attention.kernel,
            kernel_options=attention.options,
            causal=attention.causal,
            rotary=attention.rotary,
        )
        self.mlp_norm = SequenceParallelLayerNorm(hidden_size, group, sp)
        self.mlp = ParallelMLP(hidden_size, ffn_size, group, init, num_layers, sequence_parallel=sp)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, H) (this rank's (B, T / tp, H) under sequence parallelism); key_padding_mask
        (B, T) or (1, T) bool over the whole sequence, True = real token."""
        attended = self.attn(self.attn_norm(x), key_padding_mask)
        x = x + hidden_dropout(attended, self.dropout, self.training, self.layout)
        return x + hidden_dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training, self.layout)


class TransformerStack(nn.Module):
    """``num_layers`` blocks followed by a final LayerNorm (on the slices, under sequence parallelism).

    Block ``i`` draws its weights in the random stream of the piece ``"{name}.block.{i}"``
    (:meth:`WeightInit.seeded`), as the pipeline's layers do. ``attention``: one
    :class:`BlockAttention` for every block, or one per block (:func:`tower_attention`).

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
        sequence_parallel: bool = False,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        attention: Union[BlockAttention, Sequence[BlockAttention], None] = None,
    ) -> None:
        super().__init__()
        per_layer = list(attention) if isinstance(attention, (list, tuple)) else [attention] * num_layers
        if len(per_layer) != num_layers:
            raise ValueError(f"{len(per_layer)} attention settings for {num_layers} layers; give one per layer")
        blocks = []
        for index in range(num_layers):
            with init.seeded(f"{name}.block.{index}"):
                block = TransformerBlock(
                    hidden_size, num_heads, ffn_size, group, init, num_layers, sequence_parallel, dropout,
                    attention_dropout, per_layer[index],
                )  # fmt: skip
            blocks.append(block)
        self.layers = nn.ModuleList(blocks)
        self.final_norm = SequenceParallelLayerNorm(hidden_size, group, sequence_parallel)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, key_padding_mask) if recompute else layer(x, key_padding_mask)
        return self.final_norm(x)
