"""Pure functions mapping global ranks to (pipeline, data, tensor) coordinates.

The layout follows DeepSpeed's ``PipeModelDataParallelTopology``: axes ``['pipe', 'data',
'model']`` in row-major order, so the tensor-parallel rank varies fastest. Ranks of one
tensor-parallel group are therefore neighbours (on one node when tp <= GPUs per node).
"""

from __future__ import annotations

from typing import NamedTuple


class Coordinates(NamedTuple):
    """Position of one rank in the (pp, dp, tp) grid."""

    pp: int
    dp: int
    tp: int


def check_sizes(world_size: int, tp: int, pp: int) -> int:
    """Validate the grid and return the data-parallel size."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel={tp} and pipeline_parallel={pp} must be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel={tp} x "
            f"pipeline_parallel={pp}"
        )
    return world_size // (tp * pp)


def rank_to_coords(rank: int, world_size: int, tp: int, pp: int = 1) -> Coordinates:
    """The (pp, dp, tp) coordinates of ``rank``."""
    dp = check_sizes(world_size, tp, pp)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return Coordinates(pp=rank // (dp * tp), dp=(rank // tp) % dp, tp=rank % tp)


def coords_to_rank(coords: Coordinates, world_size: int, tp: int, pp: int = 1) -> int:
    """Inverse of :func:`rank_to_coords`."""
    dp = check_sizes(world_size, tp, pp)
    return (coords.pp * dp + coords.dp) * tp + coords.tp


def tensor_parallel_groups(world_size: int, tp: int, pp: int = 1) -> list[list[int]]:
    """Ranks that share one model shard set: vary tp, fix (pp, dp)."""
    dp = check_sizes(world_size, tp, pp)
    return [
        [coords_to_rank(Coordinates(p, d, t), world_size, tp, pp) for t in range(tp)]
        for p in range(pp)
        for d in range(dp)
    ]


def data_parallel_groups(world_size: int, tp: int, pp: int = 1) -> list[list[int]]:
    """Ranks holding replicas of the same shard: vary dp, fix (pp, tp)."""
    dp = check_sizes(world_size, tp, pp)
    return [
        [coords_to_rank(Coordinates(p, d, t), world_size, tp, pp) for d in range(dp)]
        for p in range(pp)
        for t in range(tp)
    ]


def pipeline_parallel_groups(world_size: int, tp: int, pp: int = 1) -> list[list[int]]:
    """Ranks forming one pipeline: vary pp, fix (dp, tp)."""
    dp = check_sizes(world_size, tp, pp)
    return [
        [coords_to_rank(Coordinates(p, d, t), world_size, tp, pp) for p in range(pp)]
        for d in range(dp)
        for t in range(tp)
    ]


def model_parallel_groups(world_size: int, tp: int, pp: int = 1) -> list[list[int]]:
    """Ranks that together hold one full model replica: vary (pp, tp), fix dp."""
    dp = check_sizes(world_size, tp, pp)
    return [
        [coords_to_rank(Coordinates(p, d, t), world_size, tp, pp) for p in range(pp) for t in range(tp)]
        for d in range(dp)
    ]
