"""The multi-modal model (plain torch modules; parallelism enters through process groups)."""

from megamm.model.heads import CLAMP_ATTRIBUTE
from megamm.model.multimodal import MultiModalTransformer

__all__ = ["CLAMP_ATTRIBUTE", "MultiModalTransformer"]
