"""Attention variants; heads are split over the tensor-parallel group."""

from megamm.model.attention.self_attention import ParallelSelfAttention

__all__ = ["ParallelSelfAttention"]
