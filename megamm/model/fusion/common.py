"""What the fusion layers share: checking their inputs and saying which modality each row has.

Conventions of every fusion layer:

- A layer is built for an ordered list of modality names and always walks them in that order,
  never in the order of the dictionaries it is called with, so every rank runs the same modules
  (and so the same collectives) in the same order.
- A modality absent from the inputs is missing in every row of the batch; ``present[name]``
  (B,) bool (True = the row has it) marks it missing in some rows. A missing modality's values are
  never read: they may be anything (zeros, stale activations, random numbers).
- Nothing here syncs with the host (no ``.item()``, no data-dependent branches): which rows have
  which modality changes the numbers, never the computation that runs.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch


def check_modalities(what: str, modalities: Sequence[str]) -> tuple[str, ...]:
    """``modalities`` as a tuple, checked: at least one, no duplicates, non-empty strings."""
    names = tuple(modalities)
    if not names:
        raise ValueError(f"{what}: modalities is empty; name at least one modality (e.g. ['image', 'text'])")
    if any(not isinstance(name, str) or not name for name in names):
        raise ValueError(f"{what}: modalities must be non-empty strings, got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: modalities {list(names)} name a modality twice; list each once")
    return names


def check_inputs(
    what: str,
    modalities: Sequence[str],
    inputs: Mapping[str, torch.Tensor],
    present: Optional[Mapping[str, torch.Tensor]],
) -> torch.Tensor:
    """Check a call's inputs against the layer's ``modalities``; return one of the given tensors
    (its batch size, device and dtype are the call's).

    Every key of ``inputs`` and ``present`` must be one of ``modalities``; at least one modality
    must be given; every given tensor shares the batch size; ``present`` values are (B,) bool.
    """
    for argument, mapping in (("inputs", inputs), ("present", present or {})):
        unknown = sorted(set(mapping) - set(modalities))
        if unknown:
            raise ValueError(
                f"{what}: {argument} names {unknown}, which this layer was not built for "
                f"(its modalities: {list(modalities)})"
            )
    given = [name for name in modalities if name in inputs]
    if not given:
        raise ValueError(
            f"{what}: no modality given; pass at least one of {list(modalities)} (a batch with none "
            "still needs one tensor to say its batch size: pass it with present[name] all False)"
        )
    first = inputs[given[0]]
    batch = first.shape[0]
    for name in given:
        if inputs[name].shape[0] != batch:
            raise ValueError(
                f"{what}: inputs[{name!r}] has batch size {inputs[name].shape[0]}, inputs[{given[0]!r}] {batch}; "
                "every modality must come with the same rows"
            )
    for name, rows in (present or {}).items():
        if rows.dtype != torch.bool or tuple(rows.shape) != (batch,):
            raise ValueError(
                f"{what}: present[{name!r}] must be ({batch},) bool (True = the row has {name}), "
                f"got {tuple(rows.shape)} {rows.dtype}"
            )
    return first


def row_presence(
    name: str,
    inputs: Mapping[str, torch.Tensor],
    present: Optional[Mapping[str, torch.Tensor]],
    batch: int,
    device: torch.device,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B,) bool: which rows have modality ``name``. False everywhere when ``name`` is not in
    ``inputs``; else ``present[name]`` (default: every row), and with a token mask (B, T) also
    only rows with at least one real token."""
    if name not in inputs:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.ones(batch, dtype=torch.bool, device=device)
    if present is not None and name in present:
        rows = present[name].to(device)
    if mask is not None:
        rows = rows & mask.any(dim=1).expand(batch)
    return rows
