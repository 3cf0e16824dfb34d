"""Concatenation + MLP: the simple fusion baseline for ablations."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from megamm.model.blocks import SequenceLayout, hidden_dropout
from megamm.model.fusion.common import check_inputs, check_modalities, row_presence
from megamm.model.init import WeightInit
from megamm.parallel import ColumnParallelLinear, RowParallelLinear
from megamm.parallel.mappings import ProcessGroup


class ConcatFusion(nn.Module):
    """Pooled representations (B, E_m) per modality -> (B, ``output_size``):

        mlp([r_1 ; ... ; r_M ; p_1 ... p_M]),  mlp(u) = down(gelu(up(u)))

    in the order of ``modalities``, where a missing modality's r_m is zeros (its values are never
    read) and p_m is its presence indicator (1.0 if the row has it, else 0.0), so the MLP can tell
    a missing modality from a zero one. ``input_size``: every modality's width E, or a width per
    modality.

    Tensor-parallel: ``up`` (sum E_m + M -> ``ffn_size``) is column-parallel, ``down``
    (``ffn_size`` -> ``output_size``) row-parallel; the output is summed over ``group`` and alike on
    every rank. Both drawn (fan-in scaled, :meth:`WeightInit.linear`) as full master weights in the
    random stream of the piece ``name``, so any tensor-parallel size gives the same layer.
    ``dropout`` drops the output in training.
    """

    def __init__(
        self,
        name: str,
        modalities: Sequence[str],
        input_size: Union[int, Mapping[str, int]],
        ffn_size: int,
        output_size: int,
        group: ProcessGroup,
        init: WeightInit,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.modalities = check_modalities("ConcatFusion", modalities)
        if isinstance(input_size, int):
            sizes = {modality: input_size for modality in self.modalities}
        else:
            missing = [m for m in self.modalities if m not in input_size]
            if missing:
                raise ValueError(f"ConcatFusion: input_size gives no width for {missing}; give one per modality")
            sizes = {modality: int(input_size[modality]) for modality in self.modalities}
        self.input_sizes = sizes
        self.layout = SequenceLayout(group, sequence_parallel=False)
        self.dropout = dropout
        features = sum(sizes.values()) + len(self.modalities)  # representations and presence indicators
        with init.seeded(name):
            self.up = ColumnParallelLinear(features, ffn_size, group, init_method=init.linear(features))
            self.down = RowParallelLinear(ffn_size, output_size, group, init_method=init.linear(ffn_size))

    def forward(
        self, representations: Mapping[str, torch.Tensor], present: Optional[Mapping[str, torch.Tensor]] = None
    ) -> torch.Tensor:
        """representations[m] (B, E_m); present[m] (B,) bool (default: every row) -> (B, output_size)."""
        first = check_inputs("ConcatFusion", self.modalities, representations, present)
        batch, device, dtype = first.shape[0], first.device, first.dtype
        parts, indicators = [], []
        for modality in self.modalities:
            width = self.input_sizes[modality]
            rep = representations.get(modality)
            if rep is None:
                rep = torch.zeros(batch, width, dtype=dtype, device=device)  # (B, E_m)
            elif rep.dim() != 2 or rep.shape[1] != width:
                raise ValueError(
                    f"ConcatFusion: representations[{modality!r}] must be (B, {width}), got {tuple(rep.shape)}"
                )
            rows = row_presence(modality, representations, present, batch, device)  # (B,)
            parts.append(torch.where(rows[:, None], rep, 0.0))  # (B, E_m)
            indicators.append(rows.to(dtype))  # (B,)
        features = torch.cat(parts + [torch.stack(indicators, dim=1)], dim=1)  # (B, sum E_m + M)
        out = self.down(F.gelu(self.up(features)))  # (B, output_size), summed over the group
        return hidden_dropout(out, self.dropout, self.training, self.layout)

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}, input_sizes={self.input_sizes}"
