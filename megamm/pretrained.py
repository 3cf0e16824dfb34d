"""Pretrained models: one directory holding a model's weights, config and tokenizer.

    from megamm import MultiModalTransformer
    model = MultiModalTransformer.from_pretrained("path/to/export")
    outputs = model(text="a red square on the left", image=PIL.Image.open("x.png"))

A pretrained directory holds:

- ``model.safetensors``: every tensor of the model's ``state_dict()`` at tensor-parallel size 1
  (fp32, or bf16 when exported so), under the plain model's names;
- ``config.json``: the ``model`` section of the training config (``to_dict`` of a
  :class:`~megamm.config.ModelConfig`) and the directory's format version;
- ``tokenizer.model`` and ``processor.json``: the SentencePiece tokenizer and the image and audio
  preprocessing settings (:class:`megamm.data.Processor`).

Nothing is pickled and nothing is fetched from a network: the weights are read with safetensors,
the rest is JSON. :func:`save_pretrained` writes a model (as trained, or as loaded) and
``tools/export_checkpoint.py`` a training checkpoint of any layout, tensor by tensor
(:func:`write_pretrained`). A directory is written into a staging directory beside it and moved
into place at the end, so an interrupted write never leaves a half-written directory, nor spoils
one that was there.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from megamm.config import ConfigError, ModelConfig, config_from_dict, to_dict
from megamm.data import Processor, Tokenizer
from megamm.data.processor import PROCESSOR_FILE, TOKENIZER_FILE
from megamm.fileio import atomic_output, fsync_path
from megamm.model import MultiModalTransformer as _MultiModalTransformer
from megamm.parallel import ParallelState
from megamm.parallel.layers import shard_of

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "megamm-pretrained"
FORMAT_VERSION = 1
FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, PROCESSOR_FILE)
"""Everything a pretrained directory holds."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The weight precisions a directory may be written in, by name."""
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
_FIX = "write the directory again with save_pretrained or tools/export_checkpoint.py"


class PretrainedError(ValueError):
    """A pretrained directory is missing, incomplete, or does not fit the model it describes."""


# ------------------------------------------------------------------------------------------------
# Writing


def write_safetensors(
    path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: Optional[dict[str, str]] = None,
) -> None:  # fmt: skip
    """Write a safetensors file tensor by tensor (atomically): ``specs`` (name, dtype, shape) fixes the
    header, then ``tensors`` yields each one in the same order, converted to its spec's dtype. Only
    one tensor is held at a time, so a model of any size streams through.

    Raises:
        PretrainedError: a tensor comes in another order or shape than its spec.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape in specs:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_output(path) as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for (name, dtype, shape), (given, tensor) in zip(specs, tensors, strict=True):
            if given != name or tuple(tensor.shape) != tuple(shape):
                raise PretrainedError(f"{path}: expected {name} {tuple(shape)}, got {given} {tuple(tensor.shape)}")
            data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
            handle.write(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def config_payload(config: ModelConfig, dtype: str = "fp32", source: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What ``config.json`` holds: the format, the weights' precision, the model config."""
    payload: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "model": to_dict(config)}
    if source:
        payload["source"] = source
    return payload


def write_pretrained(
    directory: Union[str, Path],
    config: ModelConfig,
    processor: Processor,
    specs: list[tuple[str, tuple[int, ...]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: str = "fp32",
    source: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a pretrained directory: the weights streamed from ``tensors`` (name and shape in the
    order of ``specs``, at tensor-parallel size 1, converted to ``dtype``), the config and the
    processor. Staged beside ``directory`` and moved into place once complete; an existing
    pretrained directory there is replaced only then.

    Raises:
        PretrainedError: ``directory`` exists and is neither empty nor a pretrained directory, or
            ``dtype`` is unknown.
    """
    if dtype not in DTYPES:
        raise PretrainedError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not (target / CONFIG_FILE).is_file():
        raise PretrainedError(
            f"{target} exists and is not a pretrained directory (no {CONFIG_FILE}); give a new or empty directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        weight_specs = [(name, DTYPES[dtype], tuple(shape)) for name, shape in specs]
        write_safetensors(staging / WEIGHTS_FILE, weight_specs, tensors, {"format": "pt", "megamm": str(FORMAT_VERSION)})
        with atomic_output(staging / CONFIG_FILE) as handle:
            handle.write((json.dumps(config_payload(config, dtype, source), indent=2) + "\n").encode("utf-8"))
        processor.save(staging)
        _swap_in(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _swap_in(staging: Path, target: Path) -> None:
    """Move the complete ``staging`` directory onto ``target`` (an old one is removed only after)."""
    fsync_path(staging)
    if not target.exists():
        os.rename(staging, target)
    else:
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(target.parent)


def _as_processor(model: nn.Module, tokenizer: Union[None, Tokenizer, Processor, str, Path]) -> Processor:
    if isinstance(tokenizer, Processor):
        return tokenizer
    if tokenizer is None:
        if getattr(model, "processor", None) is None:
            raise PretrainedError(
                "save_pretrained needs the model's tokenizer: pass tokenizer= (a megamm.data.Tokenizer or the path "
                "of its .model file, data.tokenizer of the training config)"
            )
        return model.processor
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer(tokenizer, field_name="tokenizer")
    return Processor.for_model(tokenizer, model.config)


def save_pretrained(
    model: nn.Module, directory: Union[str, Path], tokenizer: Union[None, Tokenizer, Processor, str, Path] = None,
    dtype: str = "fp32",
) -> Path:  # fmt: skip
    """Write ``model`` (a :class:`megamm.model.MultiModalTransformer` at tensor-parallel size 1, as
    trained or as loaded) as a pretrained directory, with ``tokenizer`` (a Tokenizer, its path, or a
    Processor; default: the model's attached processor). ``dtype``: ``fp32`` (bit-exact) or ``bf16``.

    Raises:
        PretrainedError: the model is split over tensor-parallel ranks, or no tokenizer is known.
    """
    if any(getattr(p, "tensor_model_parallel", False) for p in model.parameters()):
        raise PretrainedError(
            "save_pretrained takes a model at tensor-parallel size 1; export a checkpoint of a tensor-parallel "
            "run with tools/export_checkpoint.py instead"
        )
    processor = _as_processor(model, tokenizer)
    state = model.state_dict()
    specs = [(name, tuple(tensor.shape)) for name, tensor in state.items()]
    return write_pretrained(directory, model.config, processor, specs, iter(state.items()), dtype)


# ------------------------------------------------------------------------------------------------
# Reading


def _check_files(directory: Path) -> None:
    if not directory.is_dir():
        raise PretrainedError(f"{directory} is not a directory; give the directory save_pretrained or "
                              "tools/export_checkpoint.py wrote")  # fmt: skip
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise PretrainedError(f"{directory} is not a complete pretrained directory: {', '.join(missing)} missing; {_FIX}")


def load_config_file(directory: Union[str, Path]) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config ``config.json`` of ``directory`` describes, and the whole payload.

    Raises:
        PretrainedError: the file is unreadable, of another format, or holds an invalid config.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PretrainedError(f"{path} is unreadable ({error}); {_FIX}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("model"), dict):
        raise PretrainedError(f"{path} is not a megamm pretrained config (no format {FORMAT!r} and model section); {_FIX}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise PretrainedError(
            f"{path} has format_version {payload['format_version']}; this megamm reads up to {FORMAT_VERSION}: upgrade megamm"
        )
    model = payload["model"]
    sizes = {"image_size": model.get("image", {}).get("image_size", 32), "max_text_length": model.get("text", {}).get("max_length", 32)}
    try:
        config = config_from_dict({"model": model, "data": sizes}).model
    except ConfigError as error:
        raise PretrainedError(f"{path}: {error}") from None
    return config, payload


def load_weights(directory: Union[str, Path], expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` in ``directory``, checked against ``expected`` (name ->
    shape, at tensor-parallel size 1): no pickle, every tensor present, none extra, each of its shape.

    Raises:
        PretrainedError: naming the file, the tensors that do not fit, and the fix.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as error:
        raise PretrainedError(f"{path} is not a readable safetensors file ({error}); {_FIX}") from None
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    misshaped = [f"{name} {tuple(tensors[name].shape)} (expected {tuple(shape)})"
                 for name, shape in expected.items() if name in tensors and tensors[name].shape != shape]  # fmt: skip
    if missing or extra or misshaped:
        problems = []
        for what, names in (("missing", missing), ("unexpected", extra), ("of another shape", misshaped)):
            if names:
                problems.append(f"{len(names)} {what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
        raise PretrainedError(
            f"{path} does not fit the model {Path(directory) / CONFIG_FILE} describes ({'; '.join(problems)}): "
            f"the weights and the config come from different models; {_FIX}"
        )
    return tensors


def load_pretrained_into(model: nn.Module, tensors: dict[str, torch.Tensor], parallel: ParallelState) -> None:
    """Copy whole (tensor-parallel size 1) ``tensors`` into ``model``, each rank keeping its slice of
    the split parameters (their ``partition_dim`` and ``partition_stride``)."""
    size, rank = parallel.tp_size, parallel.tp_rank
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            value = tensors[name]
            param = params.get(name)
            if size > 1 and param is not None and getattr(param, "partition_dim", None) is not None:
                value = shard_of(value, rank, size, param.partition_dim, getattr(param, "partition_stride", 1))
            target.copy_(value)


class MultiModalTransformer(_MultiModalTransformer):
    """The multi-modal model (:class:`megamm.model.MultiModalTransformer`) with a pretrained
    directory's save and load: :meth:`save_pretrained`, :meth:`from_pretrained`.

    A model loaded with :meth:`from_pretrained` has its :attr:`processor` attached, so it takes raw
    inputs: ``model(text="...", image=PIL.Image.open(...), audio=waveform)``, and
    ``model.processor.decode(model.generate(image=...))`` writes captions.
    """

    def save_pretrained(
        self, directory: Union[str, Path], tokenizer: Union[None, Tokenizer, Processor, str, Path] = None,
        dtype: str = "fp32",
    ) -> Path:  # fmt: skip
        """Write this model as a pretrained directory (see :func:`save_pretrained`)."""
        return save_pretrained(self, directory, tokenizer, dtype)

    @classmethod
    def from_pretrained(
        cls,
        directory: Union[str, Path],
        parallel: Optional[ParallelState] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "MultiModalTransformer":
        """The model of a pretrained directory, its processor attached, in eval mode, on the CPU.

        Args:
            directory: what :func:`save_pretrained` or ``tools/export_checkpoint.py`` wrote.
            parallel: tensor-parallel groups to split the model over (default: one process); each
                rank keeps its slice of the whole weights.
            dtype: the parameters' dtype (default float32, whatever the file's precision).

        Raises:
            PretrainedError: files missing or unreadable, or weights that do not fit the config.
        """
        directory = Path(directory)
        _check_files(directory)
        config, _ = load_config_file(directory)
        try:
            processor = Processor.load(directory)
        except ConfigError as error:
            raise PretrainedError(str(error)) from None
        if (processor.image_size, processor.max_length) != (config.image.image_size, config.text.max_length):
            raise PretrainedError(
                f"{directory / PROCESSOR_FILE} (image_size {processor.image_size}, max_length {processor.max_length}) "
                f"does not fit {directory / CONFIG_FILE} (model.image.image_size {config.image.image_size}, "
                f"model.text.max_length {config.text.max_length}); {_FIX}"
            )
        parallel = parallel or ParallelState.single()
        model = cls(config, parallel, seed=0)
        whole = model
        if parallel.tp_size > 1:  # the file holds whole tensors: check them against the unsplit model
            with torch.device("meta"):
                whole = cls(config, seed=0)
        tensors = load_weights(directory, {name: tensor.shape for name, tensor in whole.state_dict().items()})
        load_pretrained_into(model, tensors, parallel)
        if dtype is not None:
            model.to(dtype)
        model.processor = processor
        return model.eval()


__all__ = [
    "CONFIG_FILE",
    "DTYPES",
    "FILES",
    "MultiModalTransformer",
    "PretrainedError",
    "WEIGHTS_FILE",
    "load_config_file",
    "load_weights",
    "save_pretrained",
    "write_pretrained",
    "write_safetensors",
]
