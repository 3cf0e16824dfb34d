"""Resuming on another parallel layout through DeepSpeed's universal checkpoint
(`tools/convert_checkpoint.py`), and the refusal of every other layout change.

The source runs are tests/layout_runs.py's (shared with tests/test_layout_parity.py): 6 steps,
saved at step 3, with ``data.global_batches`` (the same batches at any data-parallel size) and a
contrastive batch (``micro_batch_size`` x data-parallel size) of 8. A source's step-3 checkpoint
is converted (once per source and options) and resumed on another layout, whose steps 4-6 must
give the uninterrupted run's losses (1e-5 relative). Two of the changes cross between the
model's plain form (no pipeline stages) and its pipeline form, whose parameters are named
otherwise (``convert_checkpoint.py --to``); the names' correspondence itself is checked against
both forms' real parameters.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.distributed import run_distributed
from tests.launch import ROOT, digest, pretrain
from tests.layout_runs import SAVED, STEPS, layout_args, layout_run, losses, train


def _args(data: dict[str, str], run_dir: Path, **changes: str) -> list[str]:
    """One process's arguments on the sources' settings (data-parallel size 1), with ``changes``."""
    return layout_args(data, run_dir, 1, {k.replace("__", "."): v for k, v in changes.items()})


def _convert(source: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools/convert_checkpoint.py"), str(source), "--out", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


# name: the layout of tests/layout_runs.py that the source is
SOURCES = {"zero3-dp2": "DP=2 ZeRO-3", "zero1-tp2xpp2xdp2": "TP=2 x PP=2 x DP=2, split 3,6", "zero1-tp2": "TP=2 ZeRO-1"}
# name: (source, convert_checkpoint.py options, target ranks, target data-parallel size, target layout)
CHANGES = {
    "zero3-dp2-to-dp4": ("zero3-dp2", (), 4, 4, {"parallel.zero_stage": "3"}),
    "zero1-tp2xpp2xdp2-to-pp4": ("zero1-tp2xpp2xdp2", (), 4, 1, {"parallel.zero_stage": "1", "parallel.pipeline_parallel": "4"}),
    "zero1-tp2xpp2xdp2-to-plain-tp2": (
        "zero1-tp2xpp2xdp2", ("--to", "plain"), 2, 1, {"parallel.zero_stage": "1", "parallel.tensor_parallel": "2"},
    ),
    "zero1-plain-tp2-to-pp2": (
        "zero1-tp2", ("--to", "pipeline"), 2, 1, {"parallel.zero_stage": "1", "parallel.pipeline_parallel": "2"},
    ),
}


@pytest.fixture(scope="module")
def sources(data: dict[str, str], tmp_path_factory) -> dict[str, Path]:
    return {name: layout_run(layout, data, tmp_path_factory)[0] for name, layout in SOURCES.items()}


@pytest.fixture(scope="module")
def converted(sources: dict[str, Path], tmp_path_factory) -> Callable[..., Path]:
    """``converted(source, *options)``: a checkpoint.dir holding the universal checkpoint that
    convert_checkpoint.py made of the source's step-SAVED checkpoint, converted once in this
    module (the conversion must leave its source as it was); tests resume or refuse copies of it."""
    root = tmp_path_factory.mktemp("converted")
    done: dict[tuple[str, ...], Path] = {}

    def convert(source_name: str, *options: str) -> Path:
        key = (source_name, *options)
        if key not in done:
            source = sources[source_name] / "checkpoints" / f"global_step{SAVED}"
            before = digest(source)
            out = root / f"{len(done)}" / "checkpoints"
            result = _convert(source, out, *options)
            assert result.returncode == 0, result.stderr[-3000:]
            assert digest(source) == before, "the conversion changed its source"
            done[key] = out
        return done[key]

    return convert


@pytest.mark.parametrize("name", list(CHANGES))
def test_converted_checkpoint_resumes_on_another_layout(
    data: dict[str, str], sources: dict[str, Path], converted: Callable[..., Path], tmp_path: Path, name: str
) -> None:
    source_name, options, ranks, dp, layout = CHANGES[name]
    shutil.copytree(converted(source_name, *options), tmp_path / "run" / "checkpoints")
    log = train(data, tmp_path / "run", ranks, dp, layout)
    assert "resumed from" in log and f"at step {SAVED}" in log
    uninterrupted, resumed = losses(sources[source_name]), losses(tmp_path / "run")
    assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=0), (step, resumed, uninterrupted)


def test_other_layout_changes_are_refused_naming_the_supported_paths(
    data: dict[str, str], sources: dict[str, Path], converted: Callable[..., Path], tmp_path: Path
) -> None:
    # An unconverted checkpoint on another layout: the message names the converter.
    plain = sources["zero3-dp2"]
    watched = digest(plain)
    result = pretrain(_args(data, plain, micro_batch_size="8"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was written with another parallel layout" in result.stderr
    assert "python tools/convert_checkpoint.py" in result.stderr and "universal checkpoint" in result.stderr
    assert digest(plain) == watched

    # Unconverted, a pipeline checkpoint resumed without stages: the message names --to plain.
    pipeline = sources["zero1-tp2xpp2xdp2"] / "checkpoints" / "global_step3"
    args = _args(data, tmp_path / "unconverted", micro_batch_size="8", parallel__zero_stage="1")
    result = pretrain([*args, f"--resume={pipeline}"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"python tools/convert_checkpoint.py {pipeline} --to plain --out" in result.stderr

    # Converted for the pipeline form (the source's, by default), into the plain model: parameters
    # are named otherwise, and the message names the conversion that fits.
    shutil.copytree(converted("zero1-tp2xpp2xdp2"), tmp_path / "converted" / "checkpoints")
    result = pretrain(_args(data, tmp_path / "converted", micro_batch_size="8", parallel__zero_stage="1"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "was converted for the model's pipeline form and parallel.pipeline_parallel=1 trains the plain one" in result.stderr
    assert f"python tools/convert_checkpoint.py {pipeline.resolve()} --to plain --out" in result.stderr
    assert "or resume this one with 2 or more stages" in result.stderr
    zero3 = _convert(plain / "checkpoints" / "global_step3", tmp_path / "bad", "--to", "pipeline")
    assert zero3.returncode == 2 and "parallel.zero_stage=3, which a resumed run keeps" in zero3.stderr
    assert not (tmp_path / "bad" / "global_step3").exists()

    # Turning data.global_batches off changes what the streams read: refused, naming the field
    # (another number of streams alone restarts at the next epoch: tests/test_resume.py).
    universal = tmp_path / "dp" / "checkpoints"
    shutil.copytree(converted("zero3-dp2"), universal)
    result = pretrain(_args(data, tmp_path / "dp", micro_batch_size="8", data__global_batches="false"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "another training data stream (data.global_batches changed: global_batches True -> False)" in result.stderr
    assert "--restart-data" in result.stderr

    # Converting twice is refused; so is a target that already holds the step.
    again = _convert(universal / "global_step3", tmp_path / "again")
    assert again.returncode == 2 and "already a universal checkpoint" in again.stderr
    clash = _convert(plain / "checkpoints" / "global_step3", universal)
    assert clash.returncode == 2 and "exists; give an empty --out directory" in clash.stderr



def _check_split_patterns(rank: int, world: int) -> None:
    from megamm.config import load_config
    from megamm.engine.universal import split_of
    from megamm.model import MultiModalTransformer
    from megamm.model.multimodal import weight_init
    from megamm.model.pipeline import layer_specs
    from megamm.parallel import ParallelState

    config = load_config("clip_tiny", []).model
    parallel = ParallelState.initialize(tensor_parallel=world)
    named = list(MultiModalTransformer(config, parallel).named_parameters())
    for index, spec in enumerate(layer_specs(config, parallel, weight_init(config, 0))):
        named += [(f"{index}.{name}", param) for name, param in spec.build().named_parameters()]

    def expected(name: str, param: torch.nn.Parameter) -> str:
        if not getattr(param, "tensor_model_parallel", False):
            return "replicated"
        if getattr(param, "partition_stride", 1) == 3:
            return "qkv"
        if param.partition_dim == 1:
            return "row"
        return "vocabulary" if name.endswith("token_embedding.weight") else "column"

    kinds = {name: split_of(name) for name, _ in named}
    assert kinds == {name: expected(name, param) for name, param in named}
    assert set(kinds.values()) == {"replicated", "qkv", "row", "vocabulary", "column"}


def test_split_patterns_match_how_every_parameter_is_sharded(tmp_path: Path) -> None:
    """The patterns the converter merges by agree with each parameter's own sharding marks (at TP=2),
    in both forms of the model: module names, and the pipeline's layer-numbered names."""
    run_distributed(_check_split_patterns, 2, tmp_path)


def _check_parameter_names(rank: int, world: int) -> None:
    import deepspeed

    from megamm.config import load_config
    from megamm.engine.forms import PIPELINE, PLAIN, ParameterNames
    from megamm.model import MultiModalTransformer
    from megamm.model.pipeline import MultiModalPipeline
    from megamm.parallel import ParallelState

    # Towers of unlike depth and width, so that no block or head could pass for another.
    config = load_config("clip_tiny", ["model.image.num_layers=3", "model.text.num_layers=1", "model.text.hidden_size=32"]).model
    os.environ.setdefault("LOCAL_RANK", str(rank))  # read by PipelineModule
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # joins the group already there
    parallel = ParallelState.initialize(tensor_parallel=1, pipeline_parallel=1)
    plain = dict(MultiModalTransformer(config, parallel, seed=7).named_parameters())
    pipeline = dict(MultiModalPipeline(config, parallel, seed=7).named_parameters())  # DeepSpeed's own names
    names = ParameterNames(config)

    to_plain = {name: names.to_plain(name) for name in pipeline}
    assert sorted(to_plain.values()) == sorted(plain), "not one-to-one onto the plain form's parameters"
    for name, plain_name in to_plain.items():  # the same seeded weights: the same tensor under both names
        assert torch.equal(pipeline[name], plain[plain_name]), (name, plain_name)
        assert names.to_pipeline(plain_name) == name
    assert names.form_of(plain) == PLAIN and names.form_of(pipeline) == PIPELINE
    assert names.renaming(plain, PIPELINE) == {value: key for key, value in to_plain.items()}
    assert names.renaming(pipeline, PIPELINE) == {name: name for name in pipeline}
    with pytest.raises(KeyError, match="no parameter of the model's pipeline form"):
        names.to_plain("8.block.attn.qkv.weight")  # layer 8 is the temperature, which holds no block
    with pytest.raises(ValueError, match="neither all of the plain form nor all of the pipeline form"):
        names.form_of([*plain][:1] + [*pipeline][:1])


def test_parameter_names_correspond_between_the_plain_and_pipeline_forms(tmp_path: Path) -> None:
    """Every parameter of the pipeline form (as DeepSpeed's PipelineModule names it) maps onto the
    plain model's parameter of the same seeded weights, and back."""
    run_distributed(_check_parameter_names, 1, tmp_path)
