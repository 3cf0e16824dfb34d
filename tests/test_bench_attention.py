"""tools/bench_attention.py end to end at tiny sizes: its files, ratios, the memory cap's skips; its
timings are the benchmark's to report."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT, run

PNG = b"\x89PNG\r\n\x1a\n"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "tools/bench_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_attention_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    tool = _tool()
    sizes = [
        "--lengths", "32", "256", "--heads", "2", "--head-dim", "16", "--window", "8", "--global-tokens", "2",
        "--block-size", "8", "--repeats", "5", "--iters", "1", "--min-seconds", "0", "--threads", "1",
    ]  # fmt: skip
    # A cap between the full_math estimate at T=256 (the largest) and every other configuration's.
    args = argparse.Namespace(
        batch=1, heads=2, head_dim=16, dtype="float32", window=8, global_tokens=2, block_size=8, neighbors=1,
        global_blocks=1,
    )  # fmt: skip
    largest = tool.estimate_mb("full_math", args, 256)
    others = max(tool.estimate_mb(k, args, t) for k in tool.KERNELS for t in (32, 256) if (k, t) != ("full_math", 256))
    assert others < largest
    cap_gb = (largest + others) / 2 / 1024
    command = [sys.executable, str(ROOT / "tools/bench_attention.py"), "--out", str(out), *sizes]
    command += ["--max-gb", str(cap_gb)]
    result = run(command, tmp_path / "bench.log", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["kernels"] == list(tool.KERNELS)
    for key in ("nproc", "cpu_model", "torch", "date", "command", "commit"):
        assert key in results["machine"], key
    runs = {(r["kernel"], r["length"]): r for r in results["runs"]}
    assert set(runs) == {(k, t) for k in tool.KERNELS for t in (32, 256)}
    assert runs[("full_math", 256)]["status"] == "skipped" and "--max-gb" in runs[("full_math", 256)]["reason"]
    for key, entry in runs.items():
        if key == ("full_math", 256):
            continue
        assert entry["status"] == "ok", (key, entry)
        assert len(entry["step_ms"]) == 5 and entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"], key
        assert entry["peak_mb"] >= 0, key
        full = runs[("full", key[1])]
        assert entry["time_ratio_vs_full"] == pytest.approx(entry["median_ms"] / full["median_ms"]), key

    report = (out / "results.md").read_text()
    for text in ("## Time (ms per step)", "## Peak memory (MB)", "full_math at T=256: skipped", "Machine:"):
        assert text in report, text
    assert (out / "attention.png").read_bytes()[:8] == PNG
