"""Multi-head self-attention with heads split over the tensor-parallel group; full attention by
default, or any kernel of :mod:`megamm.model.attention.core` (sparse, linear)."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Mapping, Optional, Union

import torch
from torch import nn

from megamm.model.attention.core import AttentionKernel, as_kernel
from megamm.model.attention.rotary import RotaryEmbedding
from megamm.parallel import ColumnParallelLinear, RowParallelLinear, get_rng_tracker, group_size
from megamm.parallel.layers import InitMethod
from megamm.parallel.mappings import ProcessGroup
from megamm.parallel.random import TENSOR_PARALLEL_RNG


def tensor_parallel_rng(group: ProcessGroup) -> ContextManager[None]:
    """The random stream for dropout whose input differs across the tensor-parallel ranks (their
    own heads, their own slice of the sequence): each rank's own stream,
    ``get_rng_tracker().fork()`` (seeded by :func:`megamm.parallel.model_parallel_seed`).

    A single process that never seeded the tracker draws from the default stream instead;
    at tensor_parallel > 1 an unseeded tracker is an error (the ranks' masks would agree).
    """
    tracker = get_rng_tracker()
    if TENSOR_PARALLEL_RNG in tracker.states:
        return tracker.fork()
    if group_size(group) == 1:
        return contextlib.nullcontext()
    raise RuntimeError(
        "dropout inside a tensor-parallel region needs each rank's own random stream: call "
        "megamm.parallel.model_parallel_seed(seed, tp_rank, device) before training"
    )


class ParallelSelfAttention(nn.Module):
    """Multi-head self-attention; each rank owns num_heads / tp heads.

    Q, K and V are one stacked column-parallel projection (one matmul), each rank holding
    whole heads of each; the output projection is row-parallel and sums over ranks.

    With ``sequence_parallel`` the input and output are this rank's slice of the sequence,
    (B, T / tp, H): the Q/K/V projection all-gathers the sequence and the output projection
    reduce-scatters it (Megatron's sequence parallelism); attention itself sees all T positions.

    ``attention_dropout`` drops attention probabilities in training, drawn from this rank's own
    random stream (:func:`tensor_parallel_rng`): each rank holds other heads.

    ``kernel`` chooses what runs between the projections: None or ``"full"`` (scaled dot-product
    attention, as before), ``"local"``, ``"block_sparse"`` or ``"linear"``, built with
    ``kernel_options`` (see :func:`megamm.model.attention.attention_kernel`), or a kernel object.
    ``causal``: position i attends only to positions <= i (a decoder). ``rotary``: rotary position
    embedding of queries and keys (base ``rotary_base``), positions 0 .. T - 1 of the whole
    sequence. Linear attention has no probabilities, so no ``attention_dropout``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        group: ProcessGroup,
        init_method: InitMethod,
        output_init_method: InitMethod,
        sequence_parallel: bool = False,
        attention_dropout: float = 0.0,
        kernel: Union[str, AttentionKernel, None] = None,
        kernel_options: Optional[Mapping[str, Any]] = None,
        causal: bool = False,
        rotary: bool = False,
        rotary_base: float = 10000.0,
    ) -> None:
        super().__init__()
        tp = group_size(group)
        if num_heads % tp != 0:
            raise ValueError(f"num_heads={num_heads} is not divisible by the tensor-parallel size {tp}")
        self.group = group
        self.head_dim = hidden_size // num_heads
        self.local_heads = num_heads // tp
        self.attention_dropout = attention_dropout
        self.causal = causal
        self.kernel = as_kernel(kernel, kernel_options, self.head_dim)
        if attention_dropout > 0 and not self.kernel.has_probabilities:
            raise ValueError(
                f"ParallelSelfAttention: the {self.kernel.name} kernel has no attention probabilities to drop; "
                "set attention_dropout=0"
            )
        self.rotary = RotaryEmbedding(self.head_dim, rotary_base) if rotary else None
        sequence_parallel = sequence_parallel and tp > 1
        self.qkv = ColumnParallelLinear(
            hidden_size, 3 * hidden_size, group, init_method=init_method, stacked=3, sequence_parallel=sequence_parallel
        )
        self.out = RowParallelLinear(
            hidden_size, hidden_size, group, init_method=output_init_method, sequence_parallel=sequence_parallel
        )

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, H), or (B, T / tp, H) under sequence parallelism; key_padding_mask: (B, T)
        (or (1, T), alike for every row) bool, True for real tokens, over all T positions."""
        qkv = self.qkv(x)  # (B, T, 3 * h * d): the whole sequence, this rank's heads
        batch, length, _ = qkv.shape
        qkv = qkv.view(batch, length, 3, self.local_heads, self.head_dim)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, d)
        if self.rotary is not None:
            q, k = self.rotary(q, k)  # (B, h, T, d), rotated by position
        if self.training and self.attention_dropout > 0:
            with tensor_parallel_rng(self.group):  # this rank's heads: its own masks
                context = self.kernel(
                    q, k, v, key_padding_mask, causal=self.causal, dropout_p=self.attention_dropout
                )  # (B, h, T, d)
        else:
            context = self.kernel(q, k, v, key_padding_mask, causal=self.causal)  # (B, h, T, d)
        context = context.transpose(1, 2).reshape(batch, length, self.local_heads * self.head_dim)
        return self.out(context)  # (B, T, H), or (B, T / tp, H) under sequence parallelism
