"""tools/bench_train.py end to end on a small dataset: plain PyTorch and megamm side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megamm.data import iter_captions, train_tokenizer, write_demo_dataset
from tests.launch import ROOT, run


def test_bench_train_writes_side_by_side_table(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_demo_dataset(data, train_shards=2, samples_per_shard=64, eval_samples=32, image_size=32, seed=0)
    tokenizer = train_tokenizer(iter_captions(sorted(str(p) for p in (data / "train").glob("*.tar"))), data / "t.model", 256)
    out = tmp_path / "bench"
    command = [
        sys.executable, str(ROOT / "tools/bench_train.py"), "--steps", "6", "--eval-every", "3",
        "--global-batch", "16", "--threads", "1", "--runs", "pair", "megamm_loader", "--out", str(out),
        f"data.train_shards={data / 'train'}", f"data.eval_shards={data / 'eval'}", f"data.tokenizer={tokenizer}",
    ]  # fmt: skip
    result = run(command, tmp_path / "bench.log", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]

    summary = json.loads((out / "results.json").read_text())["summary"]
    assert set(summary) == {"plain", "megamm", "megamm_loader"}
    for name, entry in summary.items():
        assert entry["runs"] == 1, name
        phases = sum(entry["phase_ms"][p][0] for p in ("data", "forward", "backward", "optimizer"))
        assert abs(phases - entry["step_ms"][0]) < 1e-6 * phases, name
        assert entry["samples_per_second"][0] == pytest.approx(16 * 1000 / entry["step_ms"][0], rel=1e-6), name
        assert 0.0 <= entry["final_R@1"][0] <= 1.0
    assert summary["megamm_loader"]["loader_samples_per_second"][0] > 0
    table = (out / "results.md").read_text()
    for label in ("plain PyTorch, 1 proc", "megamm 1 proc (TP=1)", "Loader alone:"):
        assert label in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

