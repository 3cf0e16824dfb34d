"""Configuration: layering, overrides and validation messages naming the field."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megamm.config import ConfigError, TrainConfig, load_config, parse_overrides
from megamm.engine import build_ds_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_recipe_and_overrides_layer_in_order(tmp_path: Path) -> None:
    assert load_config().model.text.hidden_size == TrainConfig().model.text.hidden_size
    tiny = load_config("clip_tiny")
    assert tiny.model.text.hidden_size == 64  # from the recipe, not the default (128)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("optim:\n  lr: 0.5\ntrain_steps: 7\n")
    config = load_config(str(recipe), ["optim.lr=0.25", "optim.betas=[0.8, 0.9]", "model.text.num_layers=3"])
    assert config.optim.lr == 0.25 and config.train_steps == 7
    assert config.optim.betas == (0.8, 0.9) and config.model.text.num_layers == 3


def test_parse_overrides_builds_nested_tree() -> None:
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=true"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": True}
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["nonsense"])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["model.text.hidden_size=100", "model.text.num_heads=3"], "model.text.hidden_size"),
        (["parallel.tensor_parallel=3"], "model.text.num_heads"),
        (["model.image.patch_size=5"], "model.image.image_size"),
        (["data.image_size=64"], "data.image_size"),
        (["model.text.vocab_size=255", "parallel.tensor_parallel=2"], "model.text.vocab_size"),
        (["precision=fp8"], "precision"),
        (["model.txt.hidden_size=8"], "model.txt"),
        (["optim.lr=fast"], "optim.lr"),
        (["model.text.attention.kind=flash"], "model.text.attention"),
        (["model.image.attention.layers=local"], "model.image.attention.layers"),
        (["model.image.attention.layers=full,sparse"], "model.image.attention"),
        (["model.text.attention.feature_map=relu"], "model.text.attention.feature_map"),
        (["model.text.attention.window=-1"], "model.text.attention.window"),
        (["model.text.positions=sinusoidal"], "model.text.positions"),
    ],
)
def test_invalid_values_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("clip_tiny", overrides)


def test_attention_kernels_per_tower_and_per_layer() -> None:
    model = load_config(
        "clip_tiny",
        ["model.image.attention.layers=local, linear", "model.image.attention.window=5",
         "model.text.attention.kind=block_sparse", "model.text.attention.block_size=8"],
    ).model  # fmt: skip
    assert model.image.attention.kinds(2) == ["local", "linear"]
    assert model.image.attention.options("local") == {"window": 5, "global_tokens": 0}
    assert model.image.attention.options("linear") == {"feature_map": "elu"}
    assert model.text.attention.kinds(2) == ["block_sparse"] * 2
    assert model.text.attention.options("block_sparse") == {"block_size": 8, "num_neighbors": 1, "num_global_blocks": 0}
    assert load_config("clip_tiny").model.text.attention.kinds(2) == ["full", "full"]


def test_world_size_must_divide_by_tensor_parallel() -> None:
    config = load_config("clip_tiny", ["parallel.tensor_parallel=2"])
    assert config.parallel.data_parallel_size(4) == 2
    with pytest.raises(ConfigError, match="parallel.tensor_parallel=2"):
        config.parallel.data_parallel_size(3)


def test_ds_config_takes_batch_sizes_from_megamm_config() -> None:
    config = load_config("clip_tiny", ["micro_batch_size=8", "grad_accum_steps=3", "precision=bf16"])
    ds = build_ds_config({"zero_optimization": {"stage": 3}}, config, dp_size=4)
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["zero_optimization"]["stage"] == config.parallel.zero_stage and ds["bf16"]["enabled"]
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config({"train_batch_size": 64}, config, dp_size=4)


def test_single_process_runs_zero_stage_0() -> None:
    """ZeRO partitions over ranks: one process has nothing to partition; any other world keeps the stage."""
    single = load_config("clip_tiny", ["parallel.zero_stage=3"])
    assert build_ds_config({}, single, dp_size=1)["zero_optimization"]["stage"] == 0
    tensor_parallel = load_config("clip_tiny", ["parallel.zero_stage=3", "parallel.tensor_parallel=2"])
    assert build_ds_config({}, tensor_parallel, dp_size=1)["zero_optimization"]["stage"] == 3
    assert build_ds_config({}, single, dp_size=2)["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        ("3", ["parallel.tensor_parallel=2"], "world size 3 is not divisible by parallel.tensor_parallel=2"),
        ("4", ["model.text.num_heads=3"], "model.text.hidden_size=64 is not divisible by model.text.num_heads=3"),
    ],
)
def test_launcher_rejects_bad_config_before_any_process_group(world: str, overrides: list[str], message: str) -> None:
    # No MASTER_ADDR and no rendezvous: had it tried to start a process group it would hang or fail differently.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE=world, RANK="0", LOCAL_RANK="0")
    result = subprocess.run(
        [sys.executable, str(ROOT / "launchers/pretrain.py"), "--config", "clip_tiny", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# --------------------------------------------------------------------------------------------
# Misuse that used to pass silently or with a raw traceback


def test_a_key_given_twice_is_refused_with_a_quoting_hint() -> None:
    with pytest.raises(ConfigError, match="train_steps is given twice"):
        load_config("clip_tiny", ["train_steps=5", "train_steps=7"])
    # What bash makes of an unquoted data.train_shards=dir/shard-{000000..000001}.tar
    expanded = ["data.train_shards=dir/shard-000000.tar", "data.train_shards=dir/shard-000001.tar"]
    with pytest.raises(ConfigError, match=r"given twice.*quote it"):
        load_config("clip_tiny", expanded)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train_steps=true", "train_steps: expected int, got True"),
        ("optim.lr=inf", "optim.lr: expected a finite number"),
        ("optim.lr=.nan", "optim.lr: expected a finite number"),
        ("model.init_std=false", "model.init_std: expected float, got False"),
        ("checkpoint.dir=", "checkpoint.dir is empty"),
        ("logging.tensorboard_dir=", "logging.tensorboard_dir is empty"),
        ("data.tokenizer=", "data.tokenizer is empty"),
        ("optim.betas=[0.9, 0.99", "does not parse"),
    ],
)
def test_values_that_used_to_be_accepted_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("clip_tiny", [override])


def test_float_overrides_still_parse() -> None:
    config = load_config("clip_tiny", ["optim.lr=1e-3", "optim.betas=[0.9, 0.95]", "optim.grad_clip=0"])
    assert config.optim.lr == 1e-3 and config.optim.betas == (0.9, 0.95) and config.optim.grad_clip == 0.0


def test_a_recipe_with_a_yaml_syntax_error_is_named(tmp_path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  embed_dim: 64\n text: [\n")
    with pytest.raises(ConfigError, match=rf"recipe {re.escape(str(recipe))} is not valid YAML at line \d+"):
        load_config(str(recipe))


@pytest.mark.parametrize(
    "template, message",
    [
        ({"zero_optimization": {"stage": 1}}, "'zero_optimization.stage': 1 but parallel.zero_stage=3"),
        ({"gradient_clipping": 0.5}, "'gradient_clipping': 0.5 but optim.grad_clip=1.0"),
        ({"bf16": {"enabled": True}}, "'bf16.enabled': True but precision=fp32"),
        ({"optimizer": {"type": "Adam"}}, "sets 'optimizer'; remove it and set optim.*"),
        ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler'"),
        ({"zero_optimisation": {"stage": 3}}, "'zero_optimisation', which megamm does not pass on"),
        ({"zero_optimization": 3}, "'zero_optimization' must be an object"),
    ],
)
def test_ds_template_never_overridden_silently(template: dict, message: str) -> None:
    config = load_config("clip_tiny")
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_ds_config(template, config, dp_size=2)


def test_ds_template_may_repeat_agreeing_values_and_must_be_an_object(tmp_path) -> None:
    from megamm.engine import load_template

    config = load_config("clip_tiny", ["optim.grad_clip=0.5"])
    ds = build_ds_config({"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}, config, dp_size=2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 3
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(array))} must be a JSON object"):
        load_template(array)
    for shipped in sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json")):
        stage = load_template(shipped)["zero_optimization"]["stage"]
        build_ds_config(load_template(shipped), load_config("clip_tiny", [f"parallel.zero_stage={stage}"]), dp_size=2)
