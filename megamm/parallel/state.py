"""ParallelState: sizes, ranks and process groups of one run, plus DeepSpeed's ``mpu`` API.

There are no module-level globals: one ``ParallelState`` is built in ``main()`` and passed
down. ``ParallelState.single()`` describes a plain one-process run (all groups are ``None``
and every collective becomes a no-op), so the same model code runs with and without
``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megamm.parallel import layout

ProcessGroup = Optional[dist.ProcessGroup]


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the (pp, dp, tp) grid and the groups it belongs to."""

    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: ProcessGroup = None
    dp_group: ProcessGroup = None
    pp_group: ProcessGroup = None
    model_parallel_group: ProcessGroup = None
    tp_group_ranks: tuple[int, ...] = (0,)
    dp_group_ranks: tuple[int, ...] = (0,)

    @classmethod
    def single(cls) -> "ParallelState":
        """A one-process run: no groups, every size 1."""
        return cls(world_size=1, rank=0, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0)

    @classmethod
    def initialize(cls, tensor_parallel: int, pipeline_parallel: int = 1) -> "ParallelState":
        """Create every group of the grid; torch.distributed must already be initialised.

        All ranks call ``new_group`` for all groups in the same order, as torch requires.
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelState.initialize needs torch.distributed to be initialised first")
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = layout.check_sizes(world, tensor_parallel, pipeline_parallel)
        coords = layout.rank_to_coords(rank, world, tensor_parallel, pipeline_parallel)

        def own_group(all_groups: list[list[int]]) -> tuple[dist.ProcessGroup, tuple[int, ...]]:
            mine: Optional[tuple[dist.ProcessGroup, tuple[int, ...]]] = None
            for ranks in all_groups:
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine = (group, tuple(ranks))
            assert mine is not None, f"rank {rank} belongs to no group of {all_groups}"
            return mine

        args = (world, tensor_parallel, pipeline_parallel)
        tp_group, tp_ranks = own_group(layout.tensor_parallel_groups(*args))
        dp_group, dp_ranks = own_group(layout.data_parallel_groups(*args))
        pp_group, _ = own_group(layout.pipeline_parallel_groups(*args))
        mp_group, _ = own_group(layout.model_parallel_groups(*args))
        return cls(
            world_size=world,
            rank=rank,
            tp_size=tensor_parallel,
            pp_size=pipeline_parallel,
            dp_size=dp,
            tp_rank=coords.tp,
            pp_rank=coords.pp,
            dp_rank=coords.dp,
            tp_group=tp_group,
            dp_group=dp_group,
            pp_group=pp_group,
            model_parallel_group=mp_group,
            tp_group_ranks=tp_ranks,
            dp_group_ranks=dp_ranks,
        )

    # ------------------------------------------------------------------------------------------
    # DeepSpeed's `mpu` interface (the subset DeepSpeed calls for ZeRO with tensor parallelism).

    def get_model_parallel_group(self) -> ProcessGroup:
        return self.model_parallel_group

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size * self.pp_size

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 in this rank's group."""
        return self.tp_group_ranks[0]

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size
