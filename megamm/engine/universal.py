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
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from deepspeed.checkpoint import constants

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


def convert_to_universal(source: Path, output_dir: Path, marker_name: str) -> Path:
    """Write ``source`` (a complete ``global_stepN`` tag) as a universal checkpoint ``output_dir/global_stepN``.

    The megamm completion marker is copied with ``"universal": true`` and written last, so an
    interrupted conversion leaves no complete-looking checkpoint.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    marker = json.loads((source / marker_name).read_text())
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
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    (target / marker_name).write_text(json.dumps({**marker, "universal": True}, indent=2))
    (output_dir / "latest").write_text(source.name)
    (output_dir / "latest_universal").write_text(source.name)
    return target
