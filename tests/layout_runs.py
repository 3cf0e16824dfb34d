"""Short training runs of clip_tiny on one parallel layout each, through the real `deepspeed`
launcher and `launchers/pretrain.py`, from one command line of overrides.

Every run sees the same global batches (``data.global_batches=true``: each data-parallel rank keeps
its rows of the global micro-batch) and the same contrastive batch per micro-step (8 pairs:
``micro_batch_size`` x data-parallel size), with two micro-batches of gradient accumulation (so a
pipeline has two micro-batches in flight). It trains STEPS steps and saves at step SAVED and at
the end.

The runs are shared: tests/test_layout_parity.py compares each layout's losses with one process's,
tests/test_layout_change.py converts their step-SAVED checkpoints and resumes them on other
layouts. :func:`layout_run` trains a layout once per test session, whichever test asks first.
"""

from __future__ import annotations

from pathlib import Path

from tests.launch import deepspeed_command, overrides, run, tensorboard_events

STEPS = 6
SAVED = 3
CONTRASTIVE_BATCH = 8

# name: (ranks, data-parallel size, overrides)
LAYOUTS: dict[str, tuple[int, int, dict[str, str]]] = {
    "one process": (1, 1, {}),
    "DP=2": (2, 2, {"parallel.zero_stage": "0"}),
    "DP=2 ZeRO-3": (2, 2, {"parallel.zero_stage": "3"}),
    "TP=2 ZeRO-1": (2, 1, {"parallel.tensor_parallel": "2", "parallel.zero_stage": "1"}),
    # Also evaluated at step SAVED and reporting MFU: tests/test_e2e_deepspeed.py reads them.
    "TP=2 x DP=2 ZeRO-3": (
        4, 2, {"parallel.tensor_parallel": "2", "parallel.zero_stage": "3", "eval_interval": str(SAVED),
               "logging.peak_tflops": "0.5"},
    ),
    "PP=2": (2, 1, {"parallel.pipeline_parallel": "2", "parallel.zero_stage": "1"}),
    # All three at once (the loss the pipeline logs is averaged over data-parallel ranks), with a
    # user-given split: tensor parallelism inside pipeline stages (PP=2 has the default split).
    "TP=2 x PP=2 x DP=2, split 3,6": (
        8, 2, {"parallel.tensor_parallel": "2", "parallel.pipeline_parallel": "2", "parallel.zero_stage": "1",
               "parallel.pipeline_partition": "3,6"},
    ),
}


def layout_args(data: dict[str, str], run_dir: Path, dp: int, changes: dict[str, str], *options: str) -> list[str]:
    """pretrain.py's arguments for a run at data-parallel size ``dp`` with the layout's ``changes``."""
    values = {
        "micro_batch_size": str(CONTRASTIVE_BATCH // dp),
        "grad_accum_steps": "2",
        "train_steps": str(STEPS),
        "optim.warmup_steps": "2",
        "logging.log_interval": "1",
        "checkpoint.save_interval": str(SAVED),
        "data.global_batches": "true",
        **changes,
    }
    return ["--config", "clip_tiny", *options, *overrides(data, run_dir, **{k.replace(".", "__"): v for k, v in values.items()})]


def train(data: dict[str, str], run_dir: Path, ranks: int, dp: int, changes: dict[str, str], *options: str) -> str:
    """One run under `deepspeed` (log beside ``run_dir``); its output. It must succeed."""
    result = run(deepspeed_command(ranks, layout_args(data, run_dir, dp, changes, *options)), run_dir.with_suffix(".log"))
    assert result.returncode == 0, f"{run_dir.name}:\n{result.stdout[-4000:]}"
    return result.stdout


def losses(run_dir: Path) -> dict[int, float]:
    """``train/loss`` by step, as TensorBoard shows it (the last value of a step logged twice)."""
    return {step: values[-1] for step, values in tensorboard_events(run_dir / "tensorboard", "train/loss").items()}


_RUNS: dict[tuple[str, str], tuple[Path, str]] = {}


def layout_run(name: str, data: dict[str, str], tmp_path_factory) -> tuple[Path, str]:
    """The run directory and output of layout ``name``, trained on its first request in this session."""
    key = (name, data["data.train_shards"])
    if key not in _RUNS:
        ranks, dp, changes = LAYOUTS[name]
        run_dir = tmp_path_factory.mktemp("layout") / "run"
        _RUNS[key] = run_dir, train(data, run_dir, ranks, dp, changes)
    return _RUNS[key]
