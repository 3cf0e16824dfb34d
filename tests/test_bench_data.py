"""tools/bench_data.py end to end at tiny sizes: every part runs and its results are sane."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.launch import ROOT, run


def test_bench_data_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable, str(ROOT / "tools/bench_data.py"), "--data", str(tmp_path / "data"), "--out", str(out),
        "--repeats", "1", "--batches", "2", "--warmup", "1", "--workers", "1", "--profile", "always",
        "--shards", "2", "--per-shard", "16", "--width", "96", "--height", "72", "--image-size", "32",
        "--micro-batch", "4", "--shuffle-buffer", "8", "--open-shards", "1",
        "--resume-shards", "6", "--resume-per-shard", "12", "--resume-size", "48", "--resume-image-size", "16",
        "--resume-shuffle-buffers", "4", "--resume-points", "0.1", "0.5", "0.9", "1.5",
    ]  # fmt: skip
    result = run(command, tmp_path / "bench.log", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]

    results = json.loads((out / "results.json").read_text())
    assert {"command", "machine", "settings", "throughput", "profile", "scaling", "resume"} <= set(results)
    assert results["machine"]["cores"] >= 1 and results["machine"]["cpu"]

    throughput = results["throughput"]
    for name in ("ours", "baseline", "ours_cpu", "baseline_cpu"):
        assert len(throughput[name]["values"]) == 1 and throughput[name]["median"] > 0, name
    assert throughput["ratio"]["median"] == throughput["ours"]["median"] / throughput["baseline"]["median"]
    assert throughput["meets_target"] == (throughput["ratio"]["median"] >= 0.9)
    for name in ("ours", "baseline"):
        assert results["profile"][name]["top_self"] and results["profile"][name]["samples"] == 2 * 4

    (row,) = results["scaling"]["rows"]
    assert row["workers"] == 1 and row["samples_per_s"]["median"] > 0

    resume = results["resume"]
    assert resume["epoch_samples"] == 6 * 12
    (run_,) = resume["runs"]
    points = run_["points"]
    assert [p["samples"] for p in points] == sorted({p["samples"] for p in points})
    assert points[0]["samples"] == 0 and points[-1]["samples"] > resume["epoch_samples"]  # one in the second epoch
    for point in points:
        assert point["first_batch_matches"], point
        assert point["seconds"]["median"] > 0
        # a shuffle block of 4 samples, one open shard of 12: a resume reads that shard's tar headers
        # up to the saved sample and the block's samples, less than a whole shard
        assert 0 < point["bytes"]["median"] <= resume["shard_bytes"], point
    naive = [row["bytes"] for row in resume["naive"]]
    assert naive[0] == 0 and all(a < b for a, b in zip(naive, naive[1:])), naive
    assert naive[-1] > resume["shard_bytes"] * resume["shards"]  # past a whole epoch

    report = (out / "results.md").read_text()
    for heading in ("## Throughput, one process", "## Where the time goes", "## Scaling", "## Resuming"):
        assert heading in report
    assert (out / "data.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
