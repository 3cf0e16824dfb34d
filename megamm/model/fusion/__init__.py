"""Fusion layers: exchange information between modalities and combine them, tensor-parallel.

- :class:`GatedCrossAttentionBlock` (Flamingo): a stream reads another modality through
  tanh-gated cross-attention and MLP branches whose gates start at 0; :func:`gated_positions`
  says after which layers of a stream they go.
- :class:`BottleneckFusion` (attention bottlenecks): the modalities' streams exchange information
  only through a few shared fusion tokens.
- :class:`WeightedFusion`: learned weights over the pooled modality representations, one set per
  downstream task.
- :class:`ConcatFusion`: concatenation + MLP, the baseline for ablations.

Any subset of the modalities may be present, per row (``present[m]`` (B,) bool) or per batch (a
modality absent from the call); missing ones are masked and their values never read. Each layer
walks its modalities in its constructor's order and runs every module whatever is missing, so
every rank runs the same collectives in the same order (ZeRO-3 hangs otherwise, DeepSpeed issue
7170). :data:`FUSION_KINDS` names the kinds ``model.fusion.kind`` chooses from
(:class:`~megamm.model.fusion.encoder.FusionEncoder` builds them).
"""

from megamm.config import FUSION_KINDS
from megamm.model.fusion.bottleneck import BottleneckFusion
from megamm.model.fusion.concat import ConcatFusion
from megamm.model.fusion.gated import GatedCrossAttentionBlock, gated_positions
from megamm.model.fusion.weighted import WeightedFusion

__all__ = [
    "FUSION_KINDS",
    "BottleneckFusion",
    "ConcatFusion",
    "GatedCrossAttentionBlock",
    "WeightedFusion",
    "gated_positions",
]
