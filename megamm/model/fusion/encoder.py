"""The fusion encoder the model's matching and VQA heads read: the text stream (a caption or a
question) meets the other modalities' tokens, by the kind ``model.fusion.kind`` names.

Every kind takes the same inputs and gives the same outputs (:class:`Fused`):

- ``gated``: ``num_layers`` transformer blocks over the text tokens, with a tanh-gated
  cross-attention block (:class:`GatedCrossAttentionBlock`, gates at 0) to the concatenated
  context tokens after every ``every``-th block (Flamingo);
- ``bottleneck``: :class:`BottleneckFusion` over the text, image and audio streams; its output
  tokens are the text stream's followed by the final bottleneck tokens;
- ``concat``: :class:`ConcatFusion` of the pooled representations (the ablation baseline);
- ``weighted``: :class:`WeightedFusion` of the pooled representations, one set of weights per task.

The two late kinds (``concat``, ``weighted``) fuse pooled vectors only; their token output is
the text tokens followed by the context tokens, unfused, for the decoder to attend to.
Everything runs at one width H (the text tower's); the model projects the other modalities to it.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
from torch import nn

from megamm.config import FusionConfig
from megamm.model.blocks import SequenceParallelLayerNorm, TransformerBlock
from megamm.model.encoders.text import masked_mean
from megamm.model.fusion.bottleneck import BottleneckFusion
from megamm.model.fusion.concat import ConcatFusion
from megamm.model.fusion.gated import GatedCrossAttentionBlock, gated_positions
from megamm.model.fusion.weighted import WeightedFusion
from megamm.model.init import WeightInit
from megamm.parallel.mappings import ProcessGroup

TASKS = ("itm", "vqa")
"""The tasks that read the fused representation (``weighted`` keeps weights for each)."""


class Fused(NamedTuple):
    """The fusion encoder's output (a named tuple: ZeRO-3's hooks see the tensors in it)."""

    pooled: torch.Tensor
    """(B, H): the fused representation the heads classify."""
    tokens: torch.Tensor
    """(B, T', H): token features for a decoder to cross-attend to."""
    mask: torch.Tensor
    """(B, T') bool, True = a real token."""


class FusionEncoder(nn.Module):
    """Fuses a text stream with context modalities (``context_modalities``, e.g. image and audio).

    ``forward(text, text_mask, context, context_masks, pooled, task)``:

    - text (B, T, H) tokens, text_mask (B, T) bool;
    - context[m] (B, Tm, H) tokens of modality m, context_masks[m] (B, Tm) bool, False over
      padding and over every token of a row that lacks m (the row's presence is read from it);
    - pooled[m] (B, H) pooled representations, text included (the late kinds read them);
    - task: ``"itm"`` or ``"vqa"`` (``weighted`` keeps one set of weights per task).

    Weights are drawn in the pieces ``"fusion.*"``, so any tensor-parallel size gives the tp = 1
    model split up. Every module runs on every call whatever is missing (the same collectives on
    every rank).
    """

    def __init__(
        self,
        config: FusionConfig,
        hidden_size: int,
        context_modalities: Sequence[str],
        group: ProcessGroup,
        init: WeightInit,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.kind = config.kind
        self.context_modalities = tuple(context_modalities)
        self.modalities = ("text", *self.context_modalities)
        ffn = config.ffn_size(hidden_size)
        if self.kind == "gated":
            blocks, gates = [], {}
            self.gated_after = gated_positions(config.num_layers, config.every)
            for index in range(config.num_layers):
                with init.seeded(f"fusion.block.{index}"):
                    blocks.append(TransformerBlock(
                        hidden_size, config.num_heads, ffn, group, init, config.num_layers, False, dropout,
                        attention_dropout,
                    ))  # fmt: skip
                if index in self.gated_after:
                    gates[str(index)] = GatedCrossAttentionBlock(
                        f"fusion.gated.{index}", hidden_size, hidden_size, config.num_heads, ffn, group, init,
                        config.num_layers, dropout, attention_dropout,
                    )  # fmt: skip
            self.blocks = nn.ModuleList(blocks)
            self.gated = nn.ModuleDict(gates)
            self.final_norm = SequenceParallelLayerNorm(hidden_size)
        elif self.kind == "bottleneck":
            self.bottleneck = BottleneckFusion(
                "fusion", self.modalities, hidden_size, config.bottleneck_tokens, config.num_layers, config.num_heads,
                ffn, group, init, dropout, attention_dropout,
            )  # fmt: skip
            self.final_norm = SequenceParallelLayerNorm(hidden_size)
        elif self.kind == "concat":
            self.concat = ConcatFusion("fusion", self.modalities, hidden_size, ffn, hidden_size, group, init, dropout)
        elif self.kind == "weighted":
            self.weighted = WeightedFusion(self.modalities, TASKS)
        else:
            raise ValueError(f"FusionEncoder: unknown kind {self.kind!r}")

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        context: Mapping[str, torch.Tensor],
        context_masks: Mapping[str, torch.Tensor],
        pooled: Mapping[str, torch.Tensor],
        task: str,
    ) -> Fused:
        present = {m: context_masks[m].any(dim=1) for m in self.context_modalities}  # (B,) each
        present["text"] = text_mask.any(dim=1)
        joined = torch.cat([context[m] for m in self.context_modalities], dim=1)  # (B, sum Tm, H)
        joined_mask = torch.cat([context_masks[m] for m in self.context_modalities], dim=1)  # (B, sum Tm)
        if self.kind == "gated":
            x = text
            for index, block in enumerate(self.blocks):
                x = block(x, text_mask)  # (B, T, H)
                if str(index) in self.gated:
                    x = self.gated[str(index)](x, joined, joined_mask)  # rows without context: unchanged
            x = self.final_norm(x)
            return Fused(masked_mean(x, text_mask), x, text_mask)
        if self.kind == "bottleneck":
            streams = {"text": text, **{m: context[m] for m in self.context_modalities}}
            masks = {"text": text_mask, **{m: context_masks[m] for m in self.context_modalities}}
            out, bottleneck = self.bottleneck(streams, masks, present)  # ..., (B, Nb, H)
            x = self.final_norm(torch.cat([out["text"], bottleneck], dim=1))  # (B, T + Nb, H)
            mask = torch.cat([text_mask, text_mask.new_ones(bottleneck.shape[:2])], dim=1)  # (B, T + Nb)
            return Fused(masked_mean(x, mask), x, mask)
        if self.kind == "concat":
            fused = self.concat({m: pooled[m] for m in self.modalities}, present)  # (B, H)
        else:
            fused = self.weighted({m: pooled[m] for m in self.modalities}, task, present)  # (B, H)
        tokens = torch.cat([text, joined], dim=1)  # (B, T + sum Tm, H)
        return Fused(fused, tokens, torch.cat([text_mask, joined_mask], dim=1))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, modalities={list(self.modalities)}"


__all__ = ["Fused", "FusionEncoder", "TASKS"]
