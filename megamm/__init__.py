"""megamm: multi-modal transformers trained at scale on DeepSpeed.

``megamm.MultiModalTransformer`` is the model with a pretrained directory's save and load
(:mod:`megamm.pretrained`)::

    from megamm import MultiModalTransformer
    model = MultiModalTransformer.from_pretrained("path/to/export")

It is imported on first use, so that ``import megamm.config`` (say) stays light.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = ("MultiModalTransformer", "save_pretrained")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from megamm import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'megamm' has no attribute {name!r}")


__all__ = ["MultiModalTransformer", "save_pretrained", "__version__"]
