"""Attention variants; heads are split over the tensor-parallel group.

Modules (own the projections): :class:`ParallelSelfAttention` (optionally causal, with rotary
positions) and :class:`ParallelCrossAttention`. Kernels (what runs between the projections), by
name through :func:`attention_kernel`: ``full``, ``local``, ``block_sparse``, ``linear``.
"""

from megamm.model.attention.core import (
    KERNELS,
    AttentionKernel,
    FullAttention,
    attention_kernel,
    kernel_names,
    register_kernel,
)
from megamm.model.attention.cross import ParallelCrossAttention
from megamm.model.attention.linear import LinearAttention
from megamm.model.attention.rotary import RotaryEmbedding
from megamm.model.attention.self_attention import ParallelSelfAttention
from megamm.model.attention.sparse import BlockSparseAttention, LocalAttention

__all__ = [
    "KERNELS",
    "AttentionKernel",
    "BlockSparseAttention",
    "FullAttention",
    "LinearAttention",
    "LocalAttention",
    "ParallelCrossAttention",
    "ParallelSelfAttention",
    "RotaryEmbedding",
    "attention_kernel",
    "kernel_names",
    "register_kernel",
]
