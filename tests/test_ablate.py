"""tools/ablate.py end to end: a 2-variant x 2-seed grid of 10-step runs, a failing run, a typo.

The table and results.json are checked against statistics computed here, independently, from
every run's TensorBoard event file (read back with tensorboard's EventAccumulator).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megamm.data import iter_captions, train_tokenizer, write_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
SHORT_RUN = ["train_steps=10", "micro_batch_size=8", "logging.log_interval=2", "eval_interval=5",
             "optim.warmup_steps=2"]
TARGET = 0.05


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("demo")
    write_demo_dataset(root, train_shards=4, samples_per_shard=96, eval_samples=48, image_size=32, seed=0)
    shards = sorted(str(p) for p in (root / "train").glob("*.tar"))
    tokenizer = train_tokenizer(iter_captions(shards), root / "tok.model", 256)
    return [f"data.train_shards={root / 'train'}", f"data.eval_shards={root / 'eval'}", f"data.tokenizer={tokenizer}"]


def _ablate(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the tool in its own session; on timeout SIGTERM it (it stops its runs), then kill its group."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(ROOT / "tools/ablate.py"), *args], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        pytest.fail(f"tools/ablate.py did not finish within {timeout}s")
    return subprocess.CompletedProcess(args, process.returncode, output, "")


def _events(tensorboard_dir: Path, tag: str) -> list:
    accumulator = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return sorted(accumulator.Scalars(tag), key=lambda event: event.step)


def _table(markdown: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The Markdown table's header cells and its rows, keyed by variant label then column header."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = split[0], split[2:]
    assert set(lines[1]) <= set("|-"), lines[1]
    return header, {row[0].strip("`"): dict(zip(header, row)) for row in rows}


def _mean_std(values: list[float], decimals: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}"
    return f"{statistics.fmean(values):.{decimals}f} ± {statistics.stdev(values):.{decimals}f}"


def test_grid_of_variants_and_seeds(data: list[str], tmp_path: Path) -> None:
    out = tmp_path / "lr"
    result = _ablate(["--config", "clip_tiny", "--out", str(out), "--grid", "optim.lr=1e-3,3e-3", "--seeds", "0", "1",
                      "--parallel", "2", "--target", f"text_to_image_R@1={TARGET}", "--", *SHORT_RUN, *data])
    assert result.returncode == 0, result.stdout[-4000:]

    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    with Image.open(out / "curves.png") as image:
        assert image.width >= 800 and image.height >= 600

    report = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    header, table = _table(markdown)
    assert header[:2] == ["Variant", "Seeds (ok/failed)"] and "Steps to target" in header
    assert sorted(table) == ["optim.lr=1e-3", "optim.lr=3e-3"] and markdown.count("\n| `") == 2
    assert "python tools/ablate.py --config clip_tiny" in markdown and "torch" in markdown

    runs = report["runs"]
    assert len(runs) == 4 and all(run["status"] == "ok" for run in runs)
    for label, row in table.items():
        mine = [run for run in runs if run["variant"] == label]
        assert sorted(run["seed"] for run in mine) == [0, 1] and row["Seeds (ok/failed)"] == "2/0"
        summary = next(v for v in report["variants"] if v["variant"] == label)
        finals: dict[str, list[float]] = {"train/loss": [], "eval/text_to_image_R@1": [], "eval/image_to_text_R@1": []}
        target_steps: list[float] = []
        target_seconds: list[float] = []
        for run in mine:
            run_dir = out / run["dir"]
            assert run_dir.parent.parent == out / "runs" and run_dir.name == f"seed{run['seed']}"
            assert (run_dir / "train.log").is_file() and (run_dir / "result.json").is_file()
            tensorboard = run_dir / "tensorboard"
            losses = _events(tensorboard, "train/loss")
            assert [event.step for event in losses] == [2, 4, 6, 8, 10]
            for tag in finals:
                value = _events(tensorboard, tag)[-1].value
                finals[tag].append(value)
                assert run["metrics"][tag] == pytest.approx(value, abs=1e-9)
            reached = [event for event in _events(tensorboard, "eval/text_to_image_R@1") if event.value >= TARGET]
            if reached:
                target_steps.append(reached[0].step)
                target_seconds.append(reached[0].wall_time - losses[0].wall_time)
                assert run["metrics"]["target_step"] == reached[0].step
                assert run["metrics"]["target_seconds"] == pytest.approx(target_seconds[-1], abs=1e-6)
            else:
                assert run["metrics"]["target_step"] is None and run["metrics"]["target_seconds"] is None
        for tag, column, decimals in [("train/loss", "Final train loss", 4),
                                      ("eval/text_to_image_R@1", "T→I R@1", 3),
                                      ("eval/image_to_text_R@1", "I→T R@1", 3)]:
            assert summary[tag]["mean"] == pytest.approx(statistics.fmean(finals[tag]), abs=1e-9)
            assert summary[tag]["std"] == pytest.approx(statistics.stdev(finals[tag]), abs=1e-9)
            assert row[column] == _mean_std(finals[tag], decimals), (label, column)
        if not target_steps:
            assert row["Steps to target"] == row["Seconds to target"] == "not reached (0/2)"
        else:
            partial = f" ({len(target_steps)}/2)" if len(target_steps) < 2 else ""
            assert row["Steps to target"] == _mean_std(target_steps, 1) + partial
            assert row["Seconds to target"] == _mean_std(target_seconds, 1) + partial


def test_failed_run_is_reported_and_others_complete(data: list[str], tmp_path: Path) -> None:
    # The tokenizer path passes load_config (which does not look at files) and fails in the run.
    out = tmp_path / "broken"
    args = ["--out", str(out), "--variant", "good: optim.lr=1e-3",
            "--variant", "bad: data.tokenizer=/nonexistent/tok.model", "--parallel", "2", "--", *SHORT_RUN, *data]
    result = _ablate(args)
    assert result.returncode == 1, result.stdout[-4000:]
    assert "bad seed 0: FAILED" in result.stdout

    markdown = (out / "results.md").read_text()
    _, table = _table(markdown)
    assert table["good"]["Seeds (ok/failed)"] == "1/0"
    assert all(cell != "—" for cell in table["good"].values())
    assert table["bad"]["Seeds (ok/failed)"] == "0/1"
    runs = {run["variant"]: run for run in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["good"]["status"] == "ok" and runs["bad"]["status"] == "failed"
    log = runs["bad"]["log"]
    assert f"[{log}]({log})" in markdown and "exit code 2" in markdown
    assert "does not exist" in (out / log).read_text()
    assert not (out / runs["bad"]["dir"] / "result.json").exists()

    # Resuming the ablation reuses the finished run and retries only the failed one.
    good_events = sorted((out / runs["good"]["dir"] / "tensorboard").glob("events.*"))
    result = _ablate([*args[:2], "--skip-existing", *args[2:]])
    assert result.returncode == 1 and "good seed 0: reused" in result.stdout, result.stdout[-4000:]
    assert sorted((out / runs["good"]["dir"] / "tensorboard").glob("events.*")) == good_events


def test_typo_in_override_fails_before_any_run(tmp_path: Path) -> None:
    out = tmp_path / "typo"
    result = _ablate(["--out", str(out), "--grid", "optim.lrr=1,2", "--", *SHORT_RUN], timeout=60)
    assert result.returncode == 2
    assert "optim.lrr" in result.stdout and "unknown config field" in result.stdout
    assert not out.exists()
