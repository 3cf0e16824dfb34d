#!/usr/bin/env python
"""Export a megamm training checkpoint as a pretrained model directory (weights, config, tokenizer).

    python tools/export_checkpoint.py runs/a/checkpoints/global_step400 --out exports/a-400
    python -c "from megamm import MultiModalTransformer; MultiModalTransformer.from_pretrained('exports/a-400')"

The source is any complete checkpoint megamm wrote (``<checkpoint.dir>/global_stepN``): any ZeRO
stage, tensor-parallel, pipeline-parallel and data-parallel size, or a universal checkpoint
(tools/convert_checkpoint.py). It is only read. The directory holds the model at
tensor-parallel size 1 (docs/pretrained.md):

    model.safetensors   every weight, fp32 (or --dtype bf16 / fp16), under the plain model's names
    config.json         the model section of the run's config
    tokenizer.model     the run's tokenizer (data.tokenizer, checked against the checkpoint's sha256)
    processor.json      the image and audio preprocessing settings

It streams: DeepSpeed's universal conversion reads one rank's optimizer shard at a time and
writes one file per parameter into a scratch directory (beside --out unless --scratch; it needs
about three times the fp32 model on disk, the fp32 weights and the two Adam moments), and the
weights are then written one tensor at a time. Neither the whole fp32 model nor the optimizer
state is ever held in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm import tqdm

from megamm.config import ConfigError, TrainConfig, config_from_dict
from megamm.data import Processor, Tokenizer
from megamm.engine import MARKER, convert_to_universal, read_marker, universal_form
from megamm.engine.universal import read_universal_weight
from megamm.engine.forms import PIPELINE, ParameterNames
from megamm.model import MultiModalTransformer
from megamm.pretrained import DTYPES, PretrainedError, write_pretrained


class ExportError(ValueError):
    """The checkpoint cannot be exported; the message says why and what to do."""


def _tokenizer(marker: dict[str, Any], config: TrainConfig, given: Optional[Path]) -> Tokenizer:
    """The run's tokenizer (``--tokenizer`` or the config's ``data.tokenizer``), checked against the
    fingerprint the checkpoint recorded."""
    path = given or Path(config.data.tokenizer)
    field = "--tokenizer" if given else "data.tokenizer (of the checkpoint's config)"
    if not path.is_file():
        raise ExportError(f"{field}={str(path)!r} does not exist; pass the run's tokenizer with --tokenizer PATH")
    try:
        tokenizer = Tokenizer(path, field_name=field)
    except ConfigError as error:
        raise ExportError(str(error)) from None
    recorded = marker.get("tokenizer_sha256")
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise ExportError(
            f"{path} is not the tokenizer the checkpoint was trained with (sha256 {tokenizer.fingerprint[:12]}... != "
            f"{recorded[:12]}... recorded in {MARKER}); pass the run's own tokenizer with --tokenizer PATH"
        )
    return tokenizer


def _weights(tag: Path, specs: list[tuple[str, tuple[int, ...]]], folder_of: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter's fp32 weight, read from its folder of universal checkpoint ``tag`` in turn."""
    for name, shape in tqdm(specs, desc="writing weights", unit="tensor", file=sys.stderr):
        path = tag / "zero" / folder_of[name] / "fp32.pt"
        if not path.is_file():
            raise ExportError(f"{tag} holds no weight of {name} ({path} missing): it is not a checkpoint of this model")
        value = read_universal_weight(path)
        if tuple(value.shape) != tuple(shape):
            raise ExportError(f"{path} is {tuple(value.shape)}, the model's {name} is {tuple(shape)}: not a checkpoint of this model")
        yield name, value


def export_checkpoint(
    source: Path, out: Path, tokenizer: Optional[Path] = None, dtype: str = "fp32", scratch: Optional[Path] = None,
    verbose: bool = False,
) -> Path:  # fmt: skip
    """Write checkpoint ``source`` as the pretrained directory ``out``; see the module docstring.

    Raises:
        ExportError: the checkpoint is incomplete, records no config, or the tokenizer does not match.
    """
    try:
        marker = read_marker(source)
    except FileNotFoundError as error:
        raise ExportError(str(error)) from None
    if "config" not in marker:
        raise ExportError(f"{source / MARKER} records no config (an older megamm wrote it); it cannot be exported")
    config = config_from_dict(marker["config"])
    processor = Processor.for_model(_tokenizer(marker, config, tokenizer), config.model)
    with torch.device("meta"):  # names and shapes only, at tensor-parallel size 1
        model = MultiModalTransformer(config.model, seed=0)
    state = model.state_dict()
    params = {name for name, _ in model.named_parameters()}
    if set(state) != params:
        raise ExportError(f"the model holds persistent buffers {sorted(set(state) - params)} that a checkpoint does not record")
    specs = [(name, tuple(tensor.shape)) for name, tensor in state.items()]
    universal = bool(marker.get("universal"))
    form = universal_form(marker) if universal else None
    scratch_parent = scratch or out.resolve().parent
    scratch_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".megamm-export-", dir=scratch_parent) as work:
        if universal:
            tag = source
        else:
            print(f"converting {source} (one rank's shard at a time) into {work}", file=sys.stderr)
            quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
            try:
                with quiet:
                    tag = convert_to_universal(source, Path(work), MARKER)
            except ValueError as error:
                raise ExportError(str(error)) from None
            form = universal_form(read_marker(tag))
        names = ParameterNames(config.model) if form == PIPELINE else None
        folder_of = {name: names.to_pipeline(name) if names else name for name, _ in specs}
        provenance = {"checkpoint": str(source.resolve()), "step": marker.get("step"), "tensor_parallel": marker.get("tensor_parallel", 1),
                      "pipeline_parallel": marker.get("pipeline_parallel", 1)}  # fmt: skip
        target = write_pretrained(out, config.model, processor, specs, _weights(tag, specs, folder_of), dtype, provenance)
        if not universal:
            shutil.rmtree(tag, ignore_errors=True)
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a complete checkpoint: <checkpoint.dir>/global_stepN")
    parser.add_argument("--out", type=Path, required=True, help="the pretrained directory to write (new, empty, or an earlier export)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="the run's tokenizer (default: data.tokenizer of the checkpoint's config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="precision of the weights written (default fp32)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the per-parameter files go meanwhile (default: beside --out)")
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's conversion output")
    args = parser.parse_args(argv)
    try:
        target = export_checkpoint(args.source, args.out, args.tokenizer, args.dtype, args.scratch, args.verbose)
    except (ExportError, PretrainedError, ConfigError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {target}: load it with megamm.MultiModalTransformer.from_pretrained({str(target)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
