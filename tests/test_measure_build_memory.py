"""tools/measure_build_memory.py end to end on a small model: 2 ranks, each build once.

A 57M-parameter model (0.23 GB in fp32, far above what a rank's memory moves by otherwise): built
under zero.Init at DP=2 each rank holds half of it and its resident memory grows by about that half
(plus the layer being drawn); built whole, by the whole model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT, run


def test_measure_build_memory_reports_partitioned_against_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(ROOT / "tools/measure_build_memory.py"), "--hidden", "768", "--layers", "4",
               "--ranks", "2", "--repeats", "1", "--plain-ranks", "2", "--out", str(out)]  # fmt: skip
    result = run(command, tmp_path / "measure.log", timeout=180)
    assert result.returncode == 0, result.stdout[-4000:]

    payload = json.loads((out / "results.json").read_text())
    report = (out / "results.md").read_text()
    assert "| build | ranks (TP x DP) |" in report and "## Per rank" in report
    full = payload["sizes"]["params"] * 4
    assert 0.2e9 < full < 0.26e9
    layer = payload["sizes"]["largest_layer_bytes"]
    zero, plain = payload["summaries"]["zero_init/tp1/mmap0"], payload["summaries"]["plain/tp1/mmap0"]
    assert zero["layout"] == plain["layout"] == {"ranks": 2, "tp": 1, "dp": 2}
    assert zero["partitioned"] and not plain["partitioned"]

    for run_ in payload["runs"]["zero_init/tp1/mmap0"]:
        for rank in run_["ranks"]:
            assert rank["peak_reset"]
            assert rank["held_after"] == pytest.approx(full / 2, rel=0.02)  # its half, padding aside
            assert rank["peak_held"] <= rank["held_after"] + layer
            assert rank["held_after"] * 0.95 <= rank["peak_growth"] <= rank["held_after"] + 4 * layer + 40e6
    for run_ in payload["runs"]["plain/tp1/mmap0"]:
        for rank in run_["ranks"]:
            assert rank["held_after"] == rank["peak_held"] == pytest.approx(full, rel=1e-3)
            assert rank["peak_growth"] >= rank["held_after"] * 0.95

    # Building partitioned saves about half the model on each of 2 ranks; ask for at least a quarter.
    zero_peak, plain_peak = zero["worst_rank_peak_growth"]["max"], plain["worst_rank_peak_growth"]["min"]
    assert zero_peak < plain_peak - 0.25 * full, (zero_peak, plain_peak)
    assert zero["peak_over_full"] < 0.75 and plain["peak_over_full"] >= 0.95
