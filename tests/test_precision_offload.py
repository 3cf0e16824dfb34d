"""One config chooses the precision and the memory savers: `ds_configs/zero3_offload.json`
(parameters and optimizer state offloaded) together with `parallel.activation_checkpointing`
trains exactly as plain ZeRO-3 in fp32 (so each of them does), and bf16 trains with offload.
(fp16 is refused on CPU: tests/test_misuse.py.)

TP=1 x DP=2 through the `deepspeed` launcher on loopback. The plain ZeRO-3 fp32 run is
tests/layout_runs.py's "DP=2 ZeRO-3" layout (ds_configs/zero3.json is its template); the other
runs take its arguments with their own template and precision.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.launch import ROOT
from tests.layout_runs import LAYOUTS, STEPS, layout_run, losses, train

LAYOUT = "DP=2 ZeRO-3"


def _train(data: dict[str, str], run_dir: Path, template: str, precision: str, **changes: str) -> dict[int, float]:
    ranks, dp, layout = LAYOUTS[LAYOUT]
    changes = {**layout, "precision": precision, **{key.replace("__", "."): value for key, value in changes.items()}}
    output = train(data, run_dir, ranks, dp, changes, "--ds-config", str(ROOT / "ds_configs" / template))
    assert "2 ranks: tp=1 dp=2 zero=3" in output
    return losses(run_dir)


@pytest.fixture(scope="module")
def fp32(data: dict[str, str], tmp_path_factory) -> dict[int, float]:
    run_dir, output = layout_run(LAYOUT, data, tmp_path_factory)
    assert "2 ranks: tp=1 dp=2 zero=3" in output
    return losses(run_dir)


def test_zero3_offload_with_activation_checkpointing_trains_exactly_as_zero3(
    data: dict[str, str], fp32: dict[int, float], tmp_path: Path
) -> None:
    """Both savers in one run: any difference either made to the numbers would show here."""
    saved = _train(data, tmp_path / "offload", "zero3_offload.json", "fp32", parallel__activation_checkpointing="true")
    assert sorted(saved) == list(range(1, STEPS + 1))
    assert saved == pytest.approx(fp32, rel=1e-6, abs=0)


def test_bf16_with_offload_trains_close_to_fp32(data: dict[str, str], fp32: dict[int, float], tmp_path: Path) -> None:
    bf16 = _train(data, tmp_path / "bf16", "zero3_offload.json", "bf16")
    assert sorted(bf16) == list(range(1, STEPS + 1)) and all(math.isfinite(value) for value in bf16.values())
    assert bf16 != fp32, "bf16 computed exactly as fp32: was it on?"
    assert bf16 == pytest.approx(fp32, rel=0.03)  # bf16 keeps ~3 significant digits
