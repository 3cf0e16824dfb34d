"""Tensor/data/pipeline parallel building blocks (torch.distributed only, no DeepSpeed)."""

from megamm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megamm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    shard_of,
)
from megamm.parallel.mappings import (
    copy_all_to_group,
    copy_to_group,
    gather_batch_with_grad,
    gather_from_group,
    gather_from_sequence,
    group_rank,
    group_size,
    reduce_from_group,
    reduce_scatter_to_sequence,
    scatter_to_group,
    scatter_to_sequence,
)
from megamm.parallel.random import checkpoint, get_rng_tracker, model_parallel_seed
from megamm.parallel.state import ParallelState

__all__ = [
    "ColumnParallelLinear",
    "ParallelState",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "checkpoint",
    "copy_all_to_group",
    "copy_to_group",
    "gather_batch_with_grad",
    "gather_from_group",
    "gather_from_sequence",
    "get_rng_tracker",
    "group_rank",
    "group_size",
    "model_parallel_seed",
    "normal_init",
    "reduce_from_group",
    "reduce_scatter_to_sequence",
    "scatter_to_group",
    "scatter_to_sequence",
    "shard_of",
    "vocab_parallel_cross_entropy",
]
