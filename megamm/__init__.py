"""megamm: multi-modal transformers trained at scale on DeepSpeed."""

__version__ = "0.1.0"
