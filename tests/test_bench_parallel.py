"""tools/bench_parallel.py end to end at tiny sizes: every part's files, measured bytes equal predicted,
and the pipeline bubble's bookkeeping (its fit and the formula); its timings are the benchmark's to report."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT, run

PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_parallel_writes_both_parts(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    command = [
        sys.executable, str(ROOT / "tools/bench_parallel.py"), "--part", "layers", "comm", "--out", str(out),
        "--batch", "2", "--seq", "8", "--hidden", "16", "--heads", "4", "--ffn", "32", "--vocab", "64",
        "--repeats", "2", "--iters", "2", "--warmup", "1", "--min-seconds", "0", "--threads", "1",
        "--tp", "2", "4", "--comm-steps", "2",
    ]  # fmt: skip
    result = run(command, tmp_path / "bench.log", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results["parts"]) == {"layers", "comm"}
    layers = results["parts"]["layers"]["layers"]
    assert set(layers) == {"mlp", "attention", "embedding", "block"}
    for name, entry in layers.items():
        assert len(entry["ratio"]) == 2, name
        for ours, plain, ratio in zip(entry["megamm_ms"], entry["plain_ms"], entry["ratio"]):
            assert ratio == pytest.approx(ours / plain, rel=1e-9), name
        assert entry["max_abs_output_difference"] < 1e-5, f"{name}: the two sides compute different things"

    activation = 2 * 8 * 16 * 4  # bytes of one (B, T, H) fp32 activation
    replicated = 6 * 16 * 4  # two LayerNorms' weights and biases, two row-parallel biases (fp32)
    runs = {(r["tp"], r["sequence_parallel"]): r for r in results["parts"]["comm"]["runs"]}
    assert set(runs) == {(2, False), (2, True), (4, False), (4, True)}
    for (tp, sp), entry in runs.items():
        assert entry["matches_prediction"] and entry["steps_identical"], (tp, sp)
        assert len(entry["step_ms"]) == 2
        measured, predicted = entry["measured"], entry["predicted"]
        assert measured == predicted, (tp, sp)
        share = (tp - 1) / tp
        if not sp:  # exactly Megatron's 4 all-reduces, bytes on the wire included
            assert set(measured) == {"all_reduce", "total"}
            assert measured["all_reduce"]["ring_bytes"] == pytest.approx(4 * 2 * share * activation)
        else:  # 4 all-gathers + 4 reduce-scatters of the activations, 4 small gradient all-reduces
            assert measured["all_gather"] == {"count": 4, "payload_bytes": 4 * activation, "ring_bytes": 4 * share * activation}
            assert measured["reduce_scatter"]["payload_bytes"] == 4 * activation
            assert measured["all_reduce"] == entry["predicted_parameter_gradients"]["total"]
            assert measured["all_reduce"]["payload_bytes"] == replicated

    report = (out / "results.md").read_text()
    for text in ("## Layer overhead at TP=1", "## Communication against Megatron's analysis", "TransformerBlock"):
        assert text in report
    for figure in ("layers.png", "comm.png"):
        assert (out / figure).read_bytes()[:8] == PNG, figure


def test_bench_parallel_bubble(tmp_path: Path) -> None:
    """Two pipeline stages of two tiny blocks at m = 1, 4, 16: the files, the fit, and the bubble."""
    out = tmp_path / "bench"
    micro_batches, repeats = [1, 4, 16], 9
    command = [
        sys.executable, str(ROOT / "tools/bench_parallel.py"), "--part", "bubble", "--out", str(out),
        "--batch", "2", "--seq", "16", "--hidden", "32", "--heads", "4", "--ffn", "64",
        "--stages", "2", "--blocks-per-stage", "2", "--micro-batches", *map(str, micro_batches),
        "--bubble-repeats", str(repeats), "--bubble-warmup", "1",
    ]  # fmt: skip
    result = run(command, tmp_path / "bench.log", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert set(results["parts"]) == {"bubble"}
    section = results["parts"]["bubble"]
    assert section["stages"] == 2 and section["layers_per_stage"] == [2, 2]
    fit = section["fit"]
    assert fit["slope_ms"] > 0 and fit["optimizer_step_ms"] > 0
    assert fit["intercept_ms"] == pytest.approx(fit["fill_drain_ms"] + fit["optimizer_step_ms"] + fit["residual_ms"])
    runs = section["runs"]
    assert [r["micro_batches"] for r in runs] == micro_batches
    for entry in runs:
        m = entry["micro_batches"]
        assert entry["predicted"] == pytest.approx(1 / (m + 1))  # (p - 1) / (m + p - 1) at p = 2
        assert math.isfinite(entry["last_loss"])
        for key in ("step_ms", "bubble_fit", "bubble_fit_net", "idle_timed"):
            assert len(entry[key]) == repeats, key
        step = statistics.median(entry["step_ms"])
        assert statistics.median(entry["bubble_fit"]) == pytest.approx((step - m * fit["slope_ms"]) / step)
    # Speed is the benchmark's to report (docs/benchmarks/parallel), not a test's to assert: the
    # measured bubbles are timings, so only their bookkeeping is checked above.

    report = (out / "results.md").read_text()
    for text in ("## Pipeline bubble", "predicted (p-1)/(m+p-1)", "PipelineModule"):
        assert text in report
    assert (out / "bubble.png").read_bytes()[:8] == PNG
