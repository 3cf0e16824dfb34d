"""Learned weighted fusion of pooled modality representations, with one set of weights per
downstream task."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from megamm.model.fusion.common import check_inputs, check_modalities, row_presence


class WeightedFusion(nn.Module):
    """(B, E) per modality -> (B, E): for task t, the weighted sum of the modalities a row has,
    weights softmax(w_t) over those modalities only (a masked softmax).

    ``task_logits`` (num_tasks, num_modalities) holds every task's logits w_t, initialised at 0
    (equal weights); a task's weights are :meth:`weights`. One parameter for every task, used by
    every call whatever its task: a step on one task changes only that task's row (the others get
    zero gradients), and every rank gathers and reduces the same parameter whichever tasks its
    batches serve (ZeRO-3 needs that).

    Missing modalities (absent from the call, or ``present[m]`` False for a row) get weight 0 and
    their values are never read; a row with no modality fuses to zeros. All representations must
    share the width E. No matrices, so nothing to split: the logits are replicated, and every
    tensor-parallel rank computes the same output from the same (replicated) representations.
    """

    def __init__(self, modalities: Sequence[str], tasks: Sequence[str]) -> None:
        super().__init__()
        self.modalities = check_modalities("WeightedFusion", modalities)
        self.tasks = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(
                f"WeightedFusion: tasks {list(self.tasks)} must name at least one task, each once "
                "(e.g. ['retrieval', 'captioning', 'vqa'])"
            )
        self.task_logits = nn.Parameter(torch.zeros(len(self.tasks), len(self.modalities)))  # (tasks, M)

    def task_index(self, task: str) -> int:
        """The row of ``task_logits`` holding ``task``'s logits."""
        try:
            return self.tasks.index(task)
        except ValueError:
            raise ValueError(f"WeightedFusion: unknown task {task!r}; this fusion has {list(self.tasks)}") from None

    def weights(self, task: str, present: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``task``'s weights over the modalities: (M,) without ``present``; with ``present`` (B, M)
        bool, (B, M), softmax over each row's present modalities, 0 for the others (a row with
        none: all 0)."""
        logits = self.task_logits[self.task_index(task)]  # (M,)
        if present is None:
            return torch.softmax(logits, dim=-1)  # (M,)
        logits = logits.expand(present.shape).masked_fill(~present, torch.finfo(logits.dtype).min)  # (B, M)
        return torch.where(present, torch.softmax(logits, dim=-1), 0.0)  # (B, M)

    def forward(
        self,
        representations: Mapping[str, torch.Tensor],
        task: str,
        present: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """representations[m] (B, E); present[m] (B,) bool (default: every row) -> (B, E)."""
        first = check_inputs("WeightedFusion", self.modalities, representations, present)
        for modality, rep in representations.items():
            if rep.shape != first.shape or rep.dim() != 2:
                raise ValueError(
                    f"WeightedFusion: representations[{modality!r}] is {tuple(rep.shape)}; every modality must be "
                    f"(B, E) with the same E, here {tuple(first.shape)} (project them to one width first)"
                )
        batch, device = first.shape[0], first.device
        rows = torch.stack(
            [row_presence(m, representations, present, batch, device) for m in self.modalities], dim=1
        )  # (B, M)
        stacked = torch.stack(
            [representations.get(m, torch.zeros_like(first)) for m in self.modalities], dim=1
        )  # (B, M, E)
        stacked = torch.where(rows[..., None], stacked, 0.0)  # (B, M, E): missing values never read
        weights = self.weights(task, rows).to(stacked.dtype)  # (B, M)
        return torch.einsum("bm,bme->be", weights, stacked)  # (B, E)

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}, tasks={list(self.tasks)}"
