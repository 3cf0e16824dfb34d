"""DeepSpeed's universal checkpoint for megamm: resuming on another parallel layout.

A DeepSpeed checkpoint is sharded the way the run was: over tensor-parallel ranks, pipeline
stages and (in the optimizer state) data-parallel ranks. DeepSpeed's ``ds_to_universal`` merges
it into one file per parameter (fp32 weight, Adam moments), which any layout can load
(``checkpoint.load_universal``). To merge tensor-parallel shards it must know how each parameter
was split; :func:`universal_checkpoint_info` tells it, by parameter name, for both forms of the
model (``MultiModalTransformer`` and the pipeline's layers):

- ``attn.qkv``: Q, K and V stacked, each split over the group on dim 0 (three sub-parameters);
- ``mlp.up``: column-parallel, split on dim 0 (the default);
- ``attn.out.weight``, ``mlp.down.weight``: row-parallel, split on dim 1;
- ``token_embedding.weight``: split over the vocabulary (dim 0);
- everything else is replicated on every tensor-parallel rank.

Every checkpoint megamm writes carries this information (its client state), so
``tools/convert_checkpoint.py`` needs nothing else.

DeepSpeed's loader finds each parameter's folder (``zero/<name>/``) by the name the loading engine
gives it, and the model's plain and pipeline forms name their parameters differently
(:mod:`megamm.engine.forms`). :func:`convert_to_universal` therefore writes the folders in one form,
the source's unless ``to`` asks for the other, and records it in the completion marker
(``"form"``), which the resume checks against ``parallel.pipeline_parallel``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from deepspeed.checkpoint import constants

from megamm.config import config_from_dict
from megamm.engine.forms import FORMS, PIPELINE, ParameterNames, form_for

UNIVERSAL_CHECKPOINT_INFO = constants.UNIVERSAL_CHECKPOINT_INFO
"""The client-state key DeepSpeed's converter reads the split patterns from."""

QKV = r".*\.attn\.qkv\.(weight|bias)$"
ROW_PARALLEL = (r".*\.attn\.out\.weight$", r".*\.mlp\.down\.weight$")
VOCABULARY = (r".*\.token_embedding\.weight$",)
COLUMN_PARALLEL = (r".*\.mlp\.up\.(weight|bias)$",)
REPLICATED = (r"^(?!.*(\.attn\.qkv\.|\.attn\.out\.weight|\.mlp\.down\.weight|\.mlp\.up\.|\.token_embedding\.weight)).*$",)


def universal_checkpoint_info(vocab_size: int) -> dict[str, Any]:
    """How megamm's tensor-parallel parameters are split, in DeepSpeed's universal-checkpoint terms."""
    qkv_weight = {"patterns": [QKV.replace("(weight|bias)", "weight")], "shape": (3, -1), "partition_dim": 0}
    qkv_bias = {"patterns": [QKV.replace("(weight|bias)", "bias")], "shape": (3,), "partition_dim": 0}
    return {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.3,  # sub-parameters given as a count (three equal parts)
        constants.TP_REPLICATED_PARAMETER_PATTERNS: list(REPLICATED),
        constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: list(ROW_PARALLEL),
        constants.VOCABULARY_PARAMETER_PATTERNS: list(VOCABULARY),
        constants.PARAMETER_WITH_SUB_PARAMS: [qkv_weight, qkv_bias],
        "original_vocab_size": vocab_size,
    }


def split_of(name: str) -> str:
    """The split :func:`universal_checkpoint_info` declares for parameter ``name``: one of
    ``replicated``, ``qkv``, ``row``, ``vocabulary``, ``column``."""
    import re

    kinds = {"qkv": (QKV,), "row": ROW_PARALLEL, "vocabulary": VOCABULARY, "column": COLUMN_PARALLEL, "replicated": REPLICATED}
    matched = [kind for kind, patterns in kinds.items() if any(re.match(p, name) for p in patterns)]
    if len(matched) != 1:
        raise ValueError(f"parameter {name} matches {matched or 'no'} split patterns; exactly one expected")
    return matched[0]


def source_form(marker: dict[str, Any]) -> str:
    """The form of the model that wrote the checkpoint of ``marker`` (``"plain"`` or ``"pipeline"``)."""
    return form_for(marker.get("pipeline_parallel", 1))


def universal_form(marker: dict[str, Any]) -> str:
    """The form a universal checkpoint's parameter folders are named in: the marker's ``"form"``,
    or the source's (conversions from before ``--to`` kept it)."""
    return marker.get("form") or source_form(marker)


def convert_to_universal(source: Path, output_dir: Path, marker_name: str, to: Optional[str] = None) -> Path:
    """Write ``source`` (a complete ``global_stepN`` tag) as a universal checkpoint ``output_dir/global_stepN``.

    ``to``: the form of the model that will load it, ``"plain"`` (``parallel.pipeline_parallel=1``)
    or ``"pipeline"`` (2 or more stages); by default the source's. The parameter folders are
    named for that form (:func:`rename_parameter_folders`). The megamm completion marker is copied
    with ``"universal": true``, ``"form"`` and ``"converted_from"``, and written last, so an
    interrupted conversion leaves no complete-looking checkpoint. ``source`` is only read.

    Raises:
        FileExistsError: ``output_dir`` already holds that step.
        ValueError: ``to`` is no form, the source's marker records no model config to rename by, or
            ``to`` is the pipeline form and the source ran ZeRO stage 2 or 3 (which a resumed run keeps,
            and DeepSpeed's pipeline engine does not run).
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    marker = json.loads((source / marker_name).read_text())
    form = to or source_form(marker)
    if form not in FORMS:
        raise ValueError(f"--to {form}: no such form; use {' or '.join(FORMS)}")
    if form != source_form(marker) and "config" not in marker:
        raise ValueError(
            f"{source} records no model config (an older megamm wrote it), so its parameters cannot be "
            f"renamed for the {form} form; resume it in its own form ({source_form(marker)})"
        )
    zero_stage = marker.get("config", {}).get("parallel", {}).get("zero_stage", 0)
    if form == PIPELINE and zero_stage > 1:
        raise ValueError(
            f"--to pipeline: {source} was trained with parallel.zero_stage={zero_stage}, which a resumed run keeps, "
            "and pipeline stages run ZeRO stage 0 or 1 only; convert it without --to and resume without pipeline stages"
        )
    target = output_dir / source.name
    if target.exists():
        raise FileExistsError(f"{target} exists; give an empty --out directory")
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    try:
        ds_to_universal(args)
        if form != source_form(marker):
            rename_parameter_folders(target, ParameterNames(config_from_dict(marker["config"]).model), form)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    converted = {**marker, "universal": True, "form": form, "converted_from": str(source.resolve())}
    (target / marker_name).write_text(json.dumps(converted, indent=2))
    (output_dir / "latest").write_text(source.name)
    (output_dir / "latest_universal").write_text(source.name)
    return target


def rename_parameter_folders(tag: Path, names: ParameterNames, to: str) -> None:
    """Rename every parameter folder ``tag/zero/<name>`` of a universal checkpoint for form ``to``.

    Every folder must belong to the other form (or already to ``to``), and the new names must
    be distinct; nothing is renamed otherwise.

    Raises:
        ValueError: a folder names no parameter of the model, or two would get one name.
    """
    zero = tag / "zero"
    folders = sorted(child.name for child in zero.iterdir() if child.is_dir())
    renaming = {old: new for old, new in names.renaming(folders, to).items() if old != new}
    if len(set(renaming.values())) != len(renaming) or set(renaming.values()) & (set(folders) - set(renaming)):
        raise ValueError(f"renaming the parameter folders of {tag} for the {to} form would merge some: {renaming}")
    for old, new in renaming.items():
        (zero / old).rename(zero / new)
