"""Attention bottlenecks (Nagrani et al. 2021, "Attention Bottlenecks for Multimodal Fusion"):
the modalities exchange information only through a few shared fusion tokens."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from megamm.model.blocks import TransformerBlock
from megamm.model.fusion.common import check_inputs, check_modalities, row_presence
from megamm.model.init import WeightInit
from megamm.parallel.mappings import ProcessGroup


class BottleneckFusion(nn.Module):
    """``num_layers`` layers of bottleneck fusion over the streams of ``modalities``.

    ``num_tokens`` learned bottleneck tokens (Nb, H) start the bottleneck z (B, Nb, H). In every
    layer each modality m runs its own pre-norm transformer block (:class:`TransformerBlock`,
    heads and MLP split over ``group``) over the concatenation [x_m ; z] (B, Tm + Nb, H), which
    updates its tokens x_m and gives its own update z_m of the bottleneck; the next bottleneck is
    the mean of the z_m over the modalities the row has. So the modalities see each other only
    through the Nb tokens.

    One width: every stream is (B, Tm, ``hidden_size``); project a stream of another width to it
    first (the fusion adds no adapters). Streams are whole on every rank (no sequence
    parallelism: a rank's slice of a stream cannot be joined to the whole bottleneck).

    Missing modalities: a modality absent from the call is missing in every row;
    ``present[m]`` (B,) bool, and a row of ``masks[m]`` without any real token, mark it missing
    in some rows. A row missing m leaves m out of its bottleneck mean (a masked mean; a row with
    no modality at all keeps its previous bottleneck) and gets its x_m back unchanged; its values
    are never read (zeros replace them before the blocks, so even NaNs there reach neither the
    outputs nor the gradients). Every layer still runs every modality's block, in the order of
    ``modalities`` (an absent one on a (B, 1, H) zero placeholder whose token is masked), and the
    bottleneck update gets gradients through every block: whatever the batch holds, each rank
    runs the same modules, collectives and parameter gathers (ZeRO-3) in the same order.

    Weights: the tokens in the random stream of the piece ``"{name}.tokens"`` (std
    :meth:`WeightInit.position`), layer l's block of modality m in ``"{name}.layer.{l}.{m}"``,
    full master weights, so any tensor-parallel size gives the same model.
    """

    def __init__(
        self,
        name: str,
        modalities: Sequence[str],
        hidden_size: int,
        num_tokens: int,
        num_layers: int,
        num_heads: int,
        ffn_size: int,
        group: ProcessGroup,
        init: WeightInit,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.modalities = check_modalities("BottleneckFusion", modalities)
        for modality in self.modalities:
            if "." in modality:
                raise ValueError(f"BottleneckFusion: modality name {modality!r} must not contain '.'; rename it")
        if num_tokens < 1:
            raise ValueError(f"BottleneckFusion: num_tokens={num_tokens} must be at least 1 (the paper uses 4)")
        if num_layers < 1:
            raise ValueError(f"BottleneckFusion: num_layers={num_layers} must be at least 1")
        self.hidden_size = hidden_size
        self.num_tokens = num_tokens
        with init.seeded(f"{name}.tokens"):
            self.tokens = nn.Parameter(torch.empty(1, num_tokens, hidden_size))  # (1, Nb, H)
            init.position()(self.tokens)
        layers = []
        for index in range(num_layers):
            blocks = {}
            for modality in self.modalities:
                with init.seeded(f"{name}.layer.{index}.{modality}"):
                    blocks[modality] = TransformerBlock(
                        hidden_size,
                        num_heads,
                        ffn_size,
                        group,
                        init,
                        num_layers,
                        dropout=dropout,
                        attention_dropout=attention_dropout,
                    )
            layers.append(nn.ModuleDict(blocks))
        self.layers = nn.ModuleList(layers)

    def _check(self, streams: Mapping[str, torch.Tensor], masks: Mapping[str, Optional[torch.Tensor]]) -> None:
        for modality, x in streams.items():
            if x.dim() != 3 or x.shape[2] != self.hidden_size:
                raise ValueError(
                    f"BottleneckFusion: streams[{modality!r}] must be (B, T, {self.hidden_size}), got {tuple(x.shape)}; "
                    f"project a stream of another width to hidden_size={self.hidden_size} first"
                )
        for modality, mask in masks.items():
            if mask is None:
                continue
            if modality not in streams:
                raise ValueError(f"BottleneckFusion: masks[{modality!r}] given without streams[{modality!r}]")
            batch, length = streams[modality].shape[:2]
            if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[1] != length or mask.shape[0] not in (1, batch):
                raise ValueError(
                    f"BottleneckFusion: masks[{modality!r}] must be ({batch}, {length}) or (1, {length}) bool "
                    f"(True = real token), got {tuple(mask.shape)} {mask.dtype}"
                )

    def forward(
        self,
        streams: Mapping[str, torch.Tensor],
        masks: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
        present: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """streams[m] (B, Tm, H); masks[m] (B, Tm) or (1, Tm) bool (True = real token; default: all
        real); present[m] (B,) bool (default: every row that has a real token).

        Returns the updated streams (those given, (B, Tm, H) each) and the final bottleneck
        (B, Nb, H)."""
        masks = dict(masks or {})
        first = check_inputs("BottleneckFusion", self.modalities, streams, present)
        self._check(streams, masks)
        batch, device, dtype = first.shape[0], first.device, first.dtype
        rows: dict[str, torch.Tensor] = {}  # (B,) bool per modality
        xs: dict[str, torch.Tensor] = {}  # (B, Tm, H) per modality
        key_masks: dict[str, torch.Tensor] = {}  # (B, Tm) bool per modality: its real tokens, in rows that have it
        for modality in self.modalities:
            mask = masks.get(modality)
            rows[modality] = row_presence(modality, streams, present, batch, device, mask)  # (B,)
            if modality in streams:
                # rows without the modality: zeros in, so garbage there reaches neither values nor gradients
                xs[modality] = torch.where(rows[modality][:, None, None], streams[modality], 0.0)  # (B, Tm, H)
                tokens = torch.ones(1, xs[modality].shape[1], dtype=torch.bool, device=device) if mask is None else mask
            else:  # a placeholder, so that its blocks still run
                xs[modality] = torch.zeros(batch, 1, self.hidden_size, dtype=dtype, device=device)  # (B, 1, H)
                tokens = torch.zeros(1, 1, dtype=torch.bool, device=device)
            key_masks[modality] = tokens & rows[modality][:, None]  # (B, Tm)
        counts = sum(rows[modality].to(dtype) for modality in self.modalities)  # (B,)
        has_any = (counts > 0)[:, None, None]  # (B, 1, 1)
        denominator = counts.clamp(min=1)[:, None, None]  # (B, 1, 1)
        bottleneck_mask = torch.ones(batch, self.num_tokens, dtype=torch.bool, device=device)  # (B, Nb)
        bottleneck = self.tokens.to(dtype).expand(batch, -1, -1)  # (B, Nb, H)
        for layer in self.layers:
            total = torch.zeros_like(bottleneck)  # (B, Nb, H)
            for modality in self.modalities:  # the constructor's order on every rank
                x = xs[modality]
                length = x.shape[1]
                joint = torch.cat([x, bottleneck], dim=1)  # (B, Tm + Nb, H)
                key_mask = torch.cat([key_masks[modality], bottleneck_mask], dim=1)  # (B, Tm + Nb)
                out = layer[modality](joint, key_mask)  # (B, Tm + Nb, H)
                has = rows[modality][:, None, None]  # (B, 1, 1)
                xs[modality] = torch.where(has, out[:, :length], x)  # (B, Tm, H): missing rows keep zeros
                total = total + torch.where(has, out[:, length:], 0.0)  # (B, Nb, H)
            bottleneck = torch.where(has_any, total / denominator, bottleneck)  # (B, Nb, H): masked mean
        out = {  # rows without a modality: its stream as it came
            modality: torch.where(rows[modality][:, None, None], xs[modality], streams[modality])
            for modality in self.modalities
            if modality in streams
        }
        return out, bottleneck

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}, num_tokens={self.num_tokens}, hidden_size={self.hidden_size}"
