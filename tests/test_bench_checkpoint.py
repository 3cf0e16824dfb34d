"""tools/bench_checkpoint.py end to end at a tiny size: its figures against what is on disk."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

import pytest

from tests.launch import ROOT, run

PORT = re.compile(r"--master_port (\d+)")


def _table_ratios(report: str, label: str) -> list[float]:
    """The ``**0.83x**`` ratios of the results.md table row whose label contains ``label``."""
    row = next(line for line in report.splitlines() if line.startswith("|") and label in line)
    return [float(value) for value in re.findall(r"\*\*([0-9.]+)x\*\*", row)]


def test_bench_checkpoint_reports_what_it_wrote(tmp_path: Path) -> None:
    out, workdir = tmp_path / "out", tmp_path / "work"
    command = [
        sys.executable, str(ROOT / "tools/bench_checkpoint.py"), "--params", "2M", "--repeats", "1",
        "--save-every", "2", "--keep", "--diagnose", "--workdir", str(workdir), "--out", str(out),
    ]  # fmt: skip
    result = run(command, tmp_path / "bench.log", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]

    payload = json.loads((out / "results.json").read_text())
    summary, repeats = payload["summary"], payload["result"]["repeats"]
    assert len(repeats) == 1 and summary["load_restored"]
    assert 1.5e6 < payload["result"]["params"] < 2.5e6

    # The bytes reported are the bytes of the checkpoint left on disk (--keep), file by file.
    record = repeats[0]
    checkpoint = Path(record["checkpoint_dir"])
    on_disk = {str(p.relative_to(checkpoint)): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    assert record["files"] == on_disk
    assert record["bytes"] == sum(on_disk.values()) == sum(record["rank_bytes"])
    tag = Path(record["checkpoint"])
    assert tag.parent == checkpoint and (tag / "megamm_complete.json").is_file()
    assert json.loads((tag / "megamm_complete.json").read_text())["step"] == record["saved_step"]
    optim = sorted(name for name in on_disk if name.endswith("optim_states.pt"))
    assert len(optim) == 2  # one ZeRO-3 partition per data-parallel rank
    # fp32 master weights + Adam's two moments: 12 bytes per parameter over both partitions.
    assert sum(on_disk[name] for name in optim) == pytest.approx(12 * payload["result"]["params"], rel=0.02)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["repeat0", "result.json"]  # baseline files removed

    # MB/s are those bytes over the seconds measured, and the printed ratios divide them.
    transfers = summary["transfers"]
    for row, entry in transfers.items():
        assert entry["mb_per_s"] == pytest.approx([record["bytes"] / 1e6 / s for s in entry["seconds"]]), row
    seconds = record["seconds"]
    assert transfers["save"]["seconds"] == [seconds["save"]]
    assert transfers["save_fsync"]["seconds"] == pytest.approx([seconds["save"] + seconds["fsync_after_save"]])
    report = (out / "results.md").read_text()
    assert report.strip() in result.stdout
    for row, label, bases in (
        ("save", "**megamm save** (as in training", ("raw_write_fsync", "raw_write_fsync_ranks")),
        ("save_fsync", "**megamm save + fsync**", ("raw_write_fsync", "raw_write_fsync_ranks")),
        ("load", "**megamm load**", ("raw_read", "raw_read_ranks")),
    ):
        expected = [
            statistics.mean(transfers[row]["mb_per_s"]) / statistics.mean(transfers[base]["mb_per_s"]) for base in bases
        ]
        assert _table_ratios(report, label) == pytest.approx([round(x, 2) for x in expected], abs=0.0051), row
        assert [summary["ratios"][row][base]["ratio"] for base in bases] == pytest.approx(expected)

    # The stall: the saving step's time plus its save; the steps are the ones timed.
    stall = summary["stall"]
    assert stall["saving_step_s"]["mean"] == pytest.approx(record["step_seconds"][-1] + seconds["save"])
    assert stall["normal_step_s"]["mean"] == pytest.approx(record["step_seconds"][0])
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for rank in payload["result"]["ranks"]:
        assert set(rank["diagnose"]) == {
            "to /dev/null, CRC32", "to /dev/null, no CRC32", "to a file, CRC32 (as the save)", "to a file, no CRC32",
        }  # fmt: skip
        assert rank["max_rss_gb"] > 0

    # Nothing of the job is left in shared memory.
    port = PORT.search((out / "logs" / "job.log").read_text()).group(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


def test_bench_checkpoint_removes_what_it_wrote(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    command = [
        sys.executable, str(ROOT / "tools/bench_checkpoint.py"), "--params", "1M", "--repeats", "1",
        "--save-every", "2", "--workdir", str(workdir), "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = run(command, tmp_path / "bench.log", timeout=120)
    assert result.returncode == 0, result.stdout[-4000:]
    assert list(workdir.iterdir()) == []
