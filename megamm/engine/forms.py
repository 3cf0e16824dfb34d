"""The model's two forms, and the names their parameters go by.

At ``parallel.pipeline_parallel=1`` the plain DeepSpeed engine trains
:class:`~megamm.model.MultiModalTransformer`, whose parameters are named by module
(``"image_encoder.transformer.layers.0.attn.qkv.weight"``); at 2 or more stages DeepSpeed's
``PipelineEngine`` trains :class:`~megamm.model.pipeline.MultiModalPipeline`, whose parameters
are named by layer index (``"2.block.attn.qkv.weight"``). They are the same tensors:
:class:`ParameterNames` translates between the two, derived from the pipeline's layer order
(:func:`megamm.model.pipeline.plain_prefixes`), for any model config.

A universal checkpoint keeps one folder per parameter, named as the engine that loads it names
the parameter; ``tools/convert_checkpoint.py --to plain|pipeline`` writes either form.
"""

from __future__ import annotations

from typing import Iterable

from megamm.config import ModelConfig
from megamm.model.pipeline import plain_prefixes

PLAIN = "plain"
PIPELINE = "pipeline"
FORMS = (PLAIN, PIPELINE)


def form_for(pipeline_parallel: int) -> str:
    """The form a run with ``pipeline_parallel`` stages trains: ``"plain"`` at 1, else ``"pipeline"``."""
    return PIPELINE if pipeline_parallel > 1 else PLAIN


class ParameterNames:
    """Pipeline-form <-> plain-form parameter names of one model config.

    A name maps by its longest matching prefix (a layer's submodule in the pipeline form, the
    corresponding module in the plain one); the rest of the name is the same in both forms.
    """

    def __init__(self, config: ModelConfig) -> None:
        pairs = plain_prefixes(config)
        self._to_plain = dict(pairs)
        self._to_pipeline = {plain: pipeline for pipeline, plain in pairs}
        if len(self._to_plain) != len(pairs) or len(self._to_pipeline) != len(pairs):
            raise ValueError(f"the pipeline layers' PLAIN_NAMES are not one-to-one: {pairs}")

    def to_plain(self, name: str) -> str:
        """The plain-form name of pipeline-form parameter ``name``.

        Raises:
            KeyError: no pipeline layer of this config holds ``name``.
        """
        return _rename(name, self._to_plain, PIPELINE)

    def to_pipeline(self, name: str) -> str:
        """The pipeline-form name of plain-form parameter ``name``.

        Raises:
            KeyError: no module of this config's plain form holds ``name``.
        """
        return _rename(name, self._to_pipeline, PLAIN)

    def form_of(self, names: Iterable[str]) -> str:
        """The form all of ``names`` belong to.

        Raises:
            ValueError: some name belongs to neither form, or the names mix both.
        """
        names = list(names)
        for form, translate in ((PLAIN, self.to_pipeline), (PIPELINE, self.to_plain)):
            try:
                for name in names:
                    translate(name)
            except KeyError:
                continue
            return form
        raise ValueError(
            f"these parameter names are neither all of the plain form nor all of the pipeline form: {names[:8]}"
        )

    def renaming(self, names: Iterable[str], to: str) -> dict[str, str]:
        """``{name: its name in form to}`` for every one of ``names`` (all of one form).

        Raises:
            ValueError: ``to`` is no form, or ``names`` are not all of one form.
        """
        if to not in FORMS:
            raise ValueError(f"no form {to!r}: use one of {', '.join(FORMS)}")
        names = list(names)
        if self.form_of(names) == to:
            return {name: name for name in names}
        translate = self.to_plain if to == PLAIN else self.to_pipeline
        return {name: translate(name) for name in names}


def _rename(name: str, prefixes: dict[str, str], form: str) -> str:
    """``name`` with its longest prefix in ``prefixes`` (ending at a dot, or the whole name) replaced."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in prefixes:
            return ".".join([prefixes[prefix], *parts[end:]])
    raise KeyError(f"{name} is no parameter of the model's {form} form")


__all__ = ["FORMS", "PIPELINE", "PLAIN", "ParameterNames", "form_for"]
