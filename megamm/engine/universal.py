"""DeepSpeed's universal checkpoint for megamm: resuming on another parallel layout.

A DeepSpeed checkpoint is sharded the way the run was: over tensor-parallel ranks, pipeline
stages and (in the optimizer state) data-parallel ranks. DeepSpeed's ``ds_to_universal`` merges
it into one file per parameter (fp32 weight, Adam moments), which any layout can load
(``checkpoint.load_universal``). To merge tensor-parallel shards it must know how each parameter
was split; :func:`universal_checkpoint_info` tells it, by parameter name, for both forms of the
model (``MultiModalTransformer`` and the pipeline's layers), and for every module of the whole
model (encoders, fusion, decoder, heads):

- ``attn.qkv``, ``self_attn.qkv``: Q, K and V stacked, each split on dim 0 (three sub-parameters);
- ``attn.kv``, ``cross_attn.kv``: K and V stacked, each split on dim 0 (two sub-parameters);
- ``attn.out``, ``self_attn.out``, ``cross_attn.out``, ``mlp.down``, the heads' ``mlp.out`` and
  concat fusion's ``down`` weights: row-parallel, split on dim 1;
- ``token_embedding.weight`` (text encoder, decoder): split over the vocabulary (dim 0);
- ``attn.q``, ``cross_attn.q``, ``mlp.up``, the heads' ``mlp.dense``, concat fusion's ``up``:
  column-parallel, split on dim 0 (DeepSpeed's default);
- everything else is replicated on every tensor-parallel rank.

The patterns are checked against how each parameter is really split (its ``partition_dim`` and
``partition_stride`` marks, :func:`parameter_splits`): by a test, for every fusion kind, and by
:func:`convert_to_universal` before it converts, so a module the patterns miss stops a conversion
with its name instead of being merged wrongly.

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
import re
from typing import Any, Iterable, Optional

import torch
from deepspeed.checkpoint import constants
from torch import nn

from megamm.config import config_from_dict
from megamm.engine.forms import FORMS, PIPELINE, ParameterNames, form_for

UNIVERSAL_CHECKPOINT_INFO = constants.UNIVERSAL_CHECKPOINT_INFO
"""The client-state key DeepSpeed's converter reads the split patterns from."""

QKV = r".*\.(attn|self_attn)\.qkv\.(weight|bias)$"
"""Q, K and V stacked (self-attention), each split on dim 0: three sub-parameters."""
KV = r".*\.(attn|cross_attn)\.kv\.(weight|bias)$"
"""K and V stacked (cross-attention to a context), each split on dim 0: two sub-parameters."""
ROW_PARALLEL = (
    r".*\.(attn|self_attn|cross_attn)\.out\.weight$",
    r".*\.mlp\.(down|out)\.weight$",
    r".*\.concat\.down\.weight$",
)
VOCABULARY = (r".*\.token_embedding\.weight$",)
COLUMN_PARALLEL = (
    r".*\.(attn|cross_attn)\.q\.(weight|bias)$",
    r".*\.mlp\.(up|dense)\.(weight|bias)$",
    r".*\.concat\.up\.(weight|bias)$",
)
"""Split on dim 0, DeepSpeed's default: no pattern in the info, listed for :func:`split_of`."""
SPLIT_PATTERNS = (QKV, KV, *ROW_PARALLEL, *VOCABULARY, *COLUMN_PARALLEL)
REPLICATED = (r"^(?!(?:" + "|".join(SPLIT_PATTERNS) + r")).*$",)
SPLITS = ("replicated", "qkv", "kv", "row", "vocabulary", "column")
"""The kinds of split, as :func:`split_of` and :func:`parameter_splits` name them."""
_SUB_PARAMS = {"qkv": 3, "kv": 2}


def _sub_param_entries() -> list[dict[str, Any]]:
    entries = []
    for kind, pattern in (("qkv", QKV), ("kv", KV)):
        count = _SUB_PARAMS[kind]
        entries.append({"patterns": [pattern.replace("(weight|bias)", "weight")], "shape": (count, -1), "partition_dim": 0})
        entries.append({"patterns": [pattern.replace("(weight|bias)", "bias")], "shape": (count,), "partition_dim": 0})
    return entries


def read_universal_weight(path: str | Path) -> torch.Tensor:
    """The fp32 weight in one parameter file of a universal checkpoint (``zero/<name>/fp32.pt``),
    read without unpickling code: DeepSpeed's sub-parameter record is the only class allowed."""
    from deepspeed.checkpoint.ds_to_universal import SubparamShape

    with torch.serialization.safe_globals([SubparamShape]):
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state[constants.PARAM] if isinstance(state, dict) else state


def universal_checkpoint_info(vocab_size: int, names: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """How megamm's tensor-parallel parameters are split, in DeepSpeed's universal-checkpoint terms.

    ``names``: the model's parameter names; given, only the patterns that match one of them are
    listed (DeepSpeed's converter in strict mode refuses a pattern no parameter matches, and the dual
    encoder, say, has no cross-attention). :func:`convert_to_universal` checks the patterns against
    the model's own sharding marks instead (:func:`check_split_info`).
    """
    info: dict[str, Any] = {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.3,  # sub-parameters given as a count (equal parts)
        constants.TP_REPLICATED_PARAMETER_PATTERNS: list(REPLICATED),
        constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: list(ROW_PARALLEL),
        constants.VOCABULARY_PARAMETER_PATTERNS: list(VOCABULARY),
        constants.PARAMETER_WITH_SUB_PARAMS: _sub_param_entries(),
        "original_vocab_size": vocab_size,
    }
    if names is None:
        return info
    names = list(names)

    def used(patterns: list[str]) -> list[str]:
        return [p for p in patterns if any(re.match(p, name) for name in names)]

    for key in (constants.TP_REPLICATED_PARAMETER_PATTERNS, constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
                constants.VOCABULARY_PARAMETER_PATTERNS):  # fmt: skip
        info[key] = used(info[key])
    info[constants.PARAMETER_WITH_SUB_PARAMS] = [e for e in info[constants.PARAMETER_WITH_SUB_PARAMS] if used(e["patterns"])]
    return info


def split_of(name: str, info: Optional[dict[str, Any]] = None) -> str:
    """The split that DeepSpeed's converter applies to parameter ``name`` under ``info`` (by default
    :func:`universal_checkpoint_info`'s): one of :data:`SPLITS`. It tries the patterns in its own
    order (replicated, sub-parameters, row-parallel, else dim 0; vocabulary ones are then cut to
    the vocabulary size).

    Raises:
        ValueError: ``name`` matches the split patterns of none or of several kinds (the default info).
    """
    if info is None:
        kinds = {"qkv": (QKV,), "kv": (KV,), "row": ROW_PARALLEL, "vocabulary": VOCABULARY, "column": COLUMN_PARALLEL,
                 "replicated": REPLICATED}  # fmt: skip
        matched = [kind for kind, patterns in kinds.items() if any(re.match(p, name) for p in patterns)]
        if len(matched) != 1:
            raise ValueError(f"parameter {name} matches {matched or 'no'} split patterns; exactly one expected")
        return matched[0]
    if any(re.match(p, name) for p in info.get(constants.TP_REPLICATED_PARAMETER_PATTERNS, [])):
        return "replicated"
    for entry in info.get(constants.PARAMETER_WITH_SUB_PARAMS, []):
        if any(re.match(p, name) for p in entry["patterns"]):
            count = entry["shape"][entry.get("partition_dim", 0)]
            return {count: kind for kind, count in _SUB_PARAMS.items()}.get(count, f"{count} sub-parameters")
    if any(re.match(p, name) for p in info.get(constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, [])):
        return "row"
    if any(re.match(p, name) for p in info.get(constants.VOCABULARY_PARAMETER_PATTERNS, [])):
        return "vocabulary"
    return "column"


def parameter_splits(model: nn.Module) -> dict[str, str]:
    """How each parameter of ``model`` is really split, read off the parameters' own marks
    (``partition_dim``, ``partition_stride``: megamm.parallel.layers) and their module (a
    ``VocabParallelEmbedding``'s weight is split over the vocabulary), for any tensor-parallel size:
    name -> one of :data:`SPLITS`."""
    from megamm.parallel.layers import VocabParallelEmbedding

    splits = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            dim, stride = getattr(param, "partition_dim", None), getattr(param, "partition_stride", 1)
            if dim is None:
                splits[name] = "replicated"
            elif stride > 1:
                splits[name] = {count: kind for kind, count in _SUB_PARAMS.items()}.get(stride, f"{stride} sub-parameters")
            elif dim == 1:
                splits[name] = "row"
            else:
                splits[name] = "vocabulary" if isinstance(module, VocabParallelEmbedding) else "column"
    return splits


def check_split_info(info: dict[str, Any], splits: dict[str, str], where: str) -> None:
    """Raise unless ``info`` makes DeepSpeed's converter merge every parameter of ``splits``
    (:func:`parameter_splits`) the way it was split.

    Raises:
        ValueError: naming the first parameters merged wrongly and the fix.
    """
    wrong = {name: (split_of(name, info), split) for name, split in splits.items() if split_of(name, info) != split}
    if wrong:
        details = ", ".join(f"{name} (would be merged as {got}, is {want})" for name, (got, want) in list(wrong.items())[:4])
        raise ValueError(
            f"{where}: the tensor-parallel split patterns it records do not fit {len(wrong)} parameters: {details}"
            f"{' ...' if len(wrong) > 4 else ''}. It was written by a megamm that did not know these modules: "
            "resume it at its own tensor-parallel size with this megamm and save again, or add their names to "
            "megamm/engine/universal.py"
        )


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
    if marker.get("tensor_parallel", 1) > 1 and "config" in marker:
        check_recorded_splits(source, marker)
    target = output_dir / source.name
    if target.exists():
        raise FileExistsError(f"{target} exists; give an empty --out directory")
    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=False,  # the patterns are checked against the model itself (check_recorded_splits)
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


def recorded_split_info(source: Path) -> dict[str, Any]:
    """The split patterns checkpoint ``source`` records (its first model-states file's client state)."""
    import torch

    files = sorted(f for f in source.glob("*model_states.pt") if not f.name.startswith("layer_"))  # not pipeline layers
    if not files:
        raise ValueError(f"{source} holds no *model_states.pt file: not a DeepSpeed checkpoint")
    state = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)
    info = state.get(UNIVERSAL_CHECKPOINT_INFO)
    if info is None:
        raise ValueError(f"{files[0]} records no {UNIVERSAL_CHECKPOINT_INFO}: it was not written by megamm's training")
    return info


def check_recorded_splits(source: Path, marker: dict[str, Any]) -> None:
    """Raise unless the split patterns ``source`` records merge every parameter of its model (built
    from the marker's config, on the meta device) the way it is split, under the source's names.

    Raises:
        ValueError: naming the parameters that would be merged wrongly.
    """
    import torch

    from megamm.model import MultiModalTransformer

    model_config = config_from_dict(marker["config"]).model
    with torch.device("meta"):
        splits = parameter_splits(MultiModalTransformer(model_config, seed=0))
    if source_form(marker) == PIPELINE:
        names = ParameterNames(model_config)
        splits = {names.to_pipeline(name): split for name, split in splits.items()}
    check_split_info(recorded_split_info(source), splits, str(source))


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
