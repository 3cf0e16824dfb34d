"""End to end through the real `deepspeed` launcher: 4 ranks, TP=2 x DP=2, ZeRO-3, on CPU.

Checks the TensorBoard event file (read back with tensorboard's EventAccumulator), the
checkpoints, and that a run resumed from a mid-run checkpoint reproduces the uninterrupted
run's losses step for step (model, optimizer, LR schedule and data position restored). The
uninterrupted run is tests/layout_runs.py's "TP=2 x DP=2 ZeRO-3" layout (shared with the layout
parity test): 6 steps of two micro-batches, evaluated and saved at steps 3 and 6.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megamm.config import load_config
from megamm.engine import complete_checkpoints
from megamm.model import MultiModalTransformer
from tests.launch import deepspeed_command, finished_single_process_run, run
from tests.layout_runs import LAYOUTS, SAVED, STEPS, layout_run, train

LAYOUT = "TP=2 x DP=2 ZeRO-3"


def _scalars(tensorboard_dir: Path, tag: str) -> dict[int, float]:
    accumulator = EventAccumulator(str(tensorboard_dir))
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def _losses(tensorboard_dir: Path) -> dict[int, float]:
    return _scalars(tensorboard_dir, "train/loss")


def _check_monitoring(tensorboard: Path, log: str) -> None:
    """The scalars a user watches, with values that fit their definitions, and the config as text."""
    values = {tag: _scalars(tensorboard, tag) for tag in (
        "train/grad_norm", "train/tokens_per_second", "train/samples_per_second", "train/tflops", "train/mfu",
        "memory/host_max_rss_gb", "time/data_wait_ms", "time/forward_ms", "time/backward_ms", "time/optimizer_ms",
        "data/epoch",
    )}
    for tag, by_step in values.items():
        assert sorted(by_step) == list(range(1, STEPS + 1)), tag
    for step in range(1, STEPS + 1):
        assert values["train/grad_norm"][step] > 0
        assert values["train/mfu"][step] == pytest.approx(values["train/tflops"][step] / (0.5 * 4), rel=1e-5)
        # every sample brings (32/4)^2 + 1 = 65 image tokens and 3..24 caption tokens (BOS/EOS included)
        ratio = values["train/tokens_per_second"][step] / values["train/samples_per_second"][step]
        assert 65 + 3 <= ratio <= 65 + 24, ratio
        assert all(values[f"time/{phase}_ms"][step] >= 0 for phase in ("data_wait", "forward", "backward", "optimizer"))
        assert values["time/forward_ms"][step] > 0 and 0.1 < values["memory/host_max_rss_gb"][step] < 50
        # 16 samples a step (two global micro-batches of 8) from the one stream of 128 samples
        assert values["data/epoch"][step] == (step - 1) * 16 // 128
    accumulator = EventAccumulator(str(tensorboard))
    accumulator.Reload()
    assert "config/text_summary" in accumulator.Tags()["tensors"]
    assert "train/loss_scale" not in accumulator.Tags()["scalars"], "a loss scale outside fp16"
    assert re.search(rf"step {STEPS}/{STEPS} .* TFLOP/s  eta 0s", log)


def test_train_log_checkpoint_and_exact_resume(data: dict[str, str], tmp_path_factory, tmp_path: Path) -> None:
    full, output = layout_run(LAYOUT, data, tmp_path_factory)
    assert "tp=2 dp=2 zero=3" in output
    parameters = sum(p.numel() for p in MultiModalTransformer(load_config("clip_tiny").model).parameters())  # TP=1
    assert f"model: {parameters / 1e6:.2f}M parameters (" in output
    assert "text->image R@1" in output
    # One evaluation shard over 2 data-parallel ranks: rank 1 embeds placeholders; 40 pairs, once each.
    assert f"eval at step {STEPS} over 40 pairs" in output

    losses = _losses(full / "tensorboard")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(0 < value < 10 for value in losses.values())
    assert sorted(_scalars(full / "tensorboard", "train/lr")) == list(range(1, STEPS + 1))
    assert sorted(_scalars(full / "tensorboard", "eval/text_to_image_R@1")) == [SAVED, STEPS]
    _check_monitoring(full / "tensorboard", output)
    steps = [step for step, _ in complete_checkpoints(full / "checkpoints")]
    assert steps == [SAVED, STEPS]
    # ZeRO-3 writes one optimizer/parameter shard per data-parallel rank and TP rank.
    shards = list((full / f"checkpoints/global_step{SAVED}").glob("*optim_states.pt"))
    assert len(shards) == 4, shards

    # Pretend the run died after its mid-run checkpoint: keep only that one, resume into a fresh log dir.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / f"checkpoints/global_step{SAVED}", resumed / f"checkpoints/global_step{SAVED}")
    ranks, dp, changes = LAYOUTS[LAYOUT]
    output = train(data, resumed, ranks, dp, changes, "--resume", "auto")
    assert "resumed from" in output and f"at step {SAVED}" in output
    resumed_losses = _losses(resumed / "tensorboard")
    assert sorted(resumed_losses) == list(range(SAVED + 1, STEPS + 1))
    for step, value in resumed_losses.items():
        assert value == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step


def test_fresh_run_refuses_to_overwrite_checkpoints(data: dict[str, str], tmp_path: Path) -> None:
    # A complete-looking checkpoint directory must stop a --resume none run before any rank starts.
    checkpoint = tmp_path / "run/checkpoints/global_step10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "megamm_complete.json").write_text('{"step": 10}')
    result = run(
        deepspeed_command(
            2,
            ["--config", "clip_tiny", "--resume", "none", f"checkpoint.dir={tmp_path / 'run/checkpoints'}"]
            + [f"{k}={v}" for k, v in data.items()],
        ),
        tmp_path / "refuse.log",
    )
    assert result.returncode != 0
    assert "already holds checkpoints" in result.stdout
    assert (checkpoint / "megamm_complete.json").read_text() == '{"step": 10}'


def test_zero3_tp2_dp2_training_matches_single_process(tmp_path: Path) -> None:
    """Six optimizer steps under ZeRO-3 with TP=2 x DP=2 equal plain single-process training.

    The clipping threshold is low enough to clip: the global gradient norm must count
    tensor-parallel shards once each and replicated weights once in all.
    """
    out = tmp_path / "parity.json"
    # The logit scale starts above its cap: it must be clamped in place (master copy included)
    # and keep learning, not sit frozen above the cap where the forward clamp passes no gradient.
    args = [str(out), "optim.grad_clip=0.05", "optim.warmup_steps=2", "model.logit_scale_init=5.0",
            "model.logit_scale_max=4.0"]
    command = deepspeed_command(4, args, script="tests/scripts/zero3_parity.py")
    result = run(command, tmp_path / "parity.log")
    assert result.returncode == 0, result.stdout[-4000:]
    curves = json.loads(out.read_text())
    assert any(norm > 0.05 for norm in curves["reference_grad_norms"]), "clipping never triggered"
    assert curves["zero3"] == pytest.approx(curves["reference"], rel=1e-5, abs=1e-6)
    assert curves["zero3_last_grad_norm"] == pytest.approx(curves["reference_grad_norms"][-1], rel=1e-4)
    assert curves["reference_logit_scale"] < 4.0, "the reference never moved below the cap"
    assert curves["zero3_logit_scale"] == pytest.approx(curves["reference_logit_scale"], abs=1e-6)


def test_single_process_run_without_a_launcher(data: dict[str, str], tmp_path_factory) -> None:
    """`python launchers/pretrain.py` alone is a world of one: TP=1, DP=1, same code path. It picks a
    free port for its process group: the one the skeleton always used is taken while it starts."""
    run_dir, result = finished_single_process_run(data, tmp_path_factory)
    assert "1 ranks: tp=1 dp=1 zero=0" in result.stderr  # ZeRO-3 asked for; nothing to partition
    assert "parallel.zero_stage=3: a single process has nothing to partition" in result.stderr
    assert [step for step, _ in complete_checkpoints(run_dir / "checkpoints")] == [2, 4]
    assert sorted(_losses(run_dir / "tensorboard")) == [4]  # logged at the last step (log_interval 10)
