"""Misuse through the real entry points: fail fast with exit 2, name the field or file, change nothing.

Every refused start is checked three ways: the exit status, the message (it names the field or
file), and the checksums of the shards, the checkpoints and the run directory before and after.
The run lock, the port checks and a failing rank run real processes (and the real `deepspeed`
launcher), on loopback only; every process a test starts it stops by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.launch import (
    PRETRAIN, ROOT, deepspeed_command, digest, finished_single_process_run, overrides, pretrain, run, write_bad_shard,
)

LOCK = "megamm.lock"


# ----------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def finished_run(data: dict[str, str], tmp_path_factory) -> Path:
    """A run directory with checkpoints at steps 2 and 4 and its TensorBoard events (the session's
    finished single-process run, which test_e2e_deepspeed reads too: refused starts must leave it
    as it is, and the tests that resume it work on copies)."""
    run_dir, _ = finished_single_process_run(data, tmp_path_factory)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("global_step*")) == ["global_step2", "global_step4"]
    assert not (run_dir / "checkpoints" / LOCK).exists(), "the lock outlived the run"
    return run_dir


@pytest.fixture()
def listener() -> Iterator[int]:
    """A port on 127.0.0.1 that something listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _data_root(data: dict[str, str]) -> Path:
    return Path(data["data.train_shards"]).parent


def _assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "tp=" not in result.stderr, "a process group started before the error"


# ----------------------------------------------------------------------------------------------
# Refused starts: exit 2, a named field or file, nothing on disk changed


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# (id, how the arguments differ, fragments the message must hold). In "changes", "x__y" is x.y;
# "+" adds raw arguments; "--config"/"--ds-config"/"env" set those.
CASES = [
    ("key-given-twice", {"+": ["train_steps=7"]}, ["train_steps is given twice", "give it once"]),
    (
        "brace-pattern-expanded-by-the-shell",
        {"data__train_shards": None, "+": ["data.train_shards={root}/train/shard-000000.tar",
                                            "data.train_shards={root}/train/shard-000001.tar"]},
        ["data.train_shards is given twice", "quote it"],
    ),
    ("bool-as-int", {"train_steps": "true"}, ["train_steps: expected int, got True"]),
    ("infinite-lr", {"optim__lr": "inf"}, ["optim.lr: expected a finite number"]),
    ("empty-checkpoint-dir", {"checkpoint__dir": ""}, ["checkpoint.dir is empty"]),
    ("unparsable-override", {"optim__betas": "[0.9, 0.99"}, ["optim.betas=[0.9, 0.99", "does not parse"]),
    ("yaml-syntax-error", {"--config": "{tmp}/broken.yaml"}, ["{tmp}/broken.yaml is not valid YAML at line 3"]),
    ("template-stage-1", {"--ds-config": "{tmp}/stage1.json"}, ["'zero_optimization.stage': 1 but parallel.zero_stage=3"]),
    ("template-clipping", {"--ds-config": "{tmp}/clip.json"}, ["'gradient_clipping': 0.5 but optim.grad_clip=1.0"]),
    ("template-optimizer", {"--ds-config": "{tmp}/optimizer.json"}, ["sets 'optimizer'"]),
    ("template-unknown-key", {"--ds-config": "{tmp}/typo.json"}, ["'zero_optimisation', which megamm does not pass on"]),
    ("template-array", {"--ds-config": "{tmp}/array.json"}, ["{tmp}/array.json must be a JSON object"]),
    ("template-zero-int", {"--ds-config": "{tmp}/zero_int.json"}, ["'zero_optimization' must be an object"]),
    ("train-shards-match-nothing", {"data__train_shards": "{root}/train/nothing-*.tar"}, ["data.train_shards=", "matched no files"]),
    ("too-few-samples", {"data__num_workers": "200"}, ["data.train_shards holds 128 samples, fewer than the 200 streams", "data.num_workers=200"]),
    ("eval-shards-missing", {"data__eval_shards": "{root}/eval/missing.tar"}, ["data.eval_shards=", "missing.tar", "does not exist"]),
    ("eval-shard-not-a-tar", {"data__eval_shards": "{tmp}/garbage.tar"}, ["data.eval_shards: shard {tmp}/garbage.tar is not a tar file"]),
    ("fp16-on-cpu", {"precision": "fp16"}, ["precision=fp16: the cpu accelerator cannot train in fp16"]),
    ("resume-other-model", {"model__text__num_layers": "3"}, ["global_step4 was saved with other settings", "model.text.num_layers 2 -> 3"]),
    ("resume-other-lr", {"optim__lr": "0.005"}, ["optim.lr 0.002 -> 0.005", "silently ignored"]),
    ("master-port-in-use", {"env": {"MASTER_PORT": "{port}"}}, ["MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is already in use"]),
    ("pipeline-with-zero3", {"parallel__pipeline_parallel": "2"},
     ["parallel.zero_stage=3 with parallel.pipeline_parallel=2", "runs ZeRO stages 0 and 1 only", "set parallel.zero_stage=1"]),
    ("more-stages-than-layers", {"parallel__pipeline_parallel": "12", "parallel__zero_stage": "1"},
     ["parallel.pipeline_parallel=12 stages but the model has 9 pipeline layers", "use fewer stages or more layers"]),
    ("pipeline-split-wrong-sum", {"parallel__pipeline_parallel": "2", "parallel__zero_stage": "1", "parallel__pipeline_partition": "4,4"},
     ["parallel.pipeline_partition=4,4 must give 2 positive layer counts", "the model's 9 pipeline layers"]),
    ("pipeline-split-unknown", {"parallel__pipeline_parallel": "2", "parallel__zero_stage": "1", "parallel__pipeline_partition": "balanced"},
     ["parallel.pipeline_partition='balanced' is not parameters, uniform, type:<regex>"]),
    ("stages-do-not-divide-the-world", {"parallel__pipeline_parallel": "2", "parallel__zero_stage": "1"},
     ["world size 1 is not divisible by parallel.tensor_parallel=1 x parallel.pipeline_parallel=2"]),
]


def _case_files(tmp: Path) -> None:
    _write(tmp / "broken.yaml", "model:\n  embed_dim: 64\n text: [\n")
    for name, template in {
        "stage1.json": {"zero_optimization": {"stage": 1}},
        "clip.json": {"gradient_clipping": 0.5},
        "optimizer.json": {"optimizer": {"type": "Adam", "params": {"lr": 0.1}}},
        "typo.json": {"zero_optimisation": {"stage": 3}},
        "zero_int.json": {"zero_optimization": 3},
    }.items():
        _write(tmp / name, json.dumps(template))
    _write(tmp / "array.json", "[1, 2]")
    (tmp / "garbage.tar").write_bytes(os.urandom(2048))


# Cases also tried on a fresh run directory, which a refused start must not create.
ALSO_FRESH = {"too-few-samples", "eval-shards-missing", "fp16-on-cpu", "master-port-in-use", "template-stage-1",
              "pipeline-with-zero3"}
PARAMS = [
    pytest.param(changes, fragments, state, id=f"{name}-{state}")
    for name, changes, fragments in CASES
    for state in (("resume", "fresh") if name in ALSO_FRESH else ("resume",))
]


@pytest.mark.parametrize("changes, fragments, run_state", PARAMS)
def test_refused_start_changes_nothing(
    data: dict[str, str], finished_run: Path, tmp_path: Path, listener: int, changes: dict, fragments: list[str],
    run_state: str,
) -> None:
    _case_files(tmp_path)
    run_dir = tmp_path / "fresh" if run_state == "fresh" else finished_run
    names = {"root": str(_data_root(data)), "tmp": str(tmp_path), "port": str(listener)}

    def fill(text: str) -> str:
        return text.format(**names)

    options = ["--config", fill(changes.get("--config", "clip_tiny"))]
    if "--ds-config" in changes:
        options += ["--ds-config", fill(changes["--ds-config"])]
    args = overrides(data, run_dir, **{k: v if v is None else fill(v) for k, v in changes.items() if k.isidentifier() and k != "env"})
    args += [fill(raw) for raw in changes.get("+", [])]
    env = {key: fill(value) for key, value in changes.get("env", {}).items()}

    watched = (_data_root(data), finished_run, tmp_path / "fresh")
    before = digest(*watched)
    result = pretrain([*options, *args], env)
    _assert_refused(result, *(fill(fragment) for fragment in fragments))
    assert digest(*watched) == before


# ----------------------------------------------------------------------------------------------
# Starts that proceed, and say what they resolved


def test_startup_names_split_sizes_and_the_incomplete_checkpoint_it_skips(
    data: dict[str, str], finished_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    partial = run_dir / "checkpoints" / "global_step6"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
    result = pretrain(["--config", "clip_tiny", *overrides(data, run_dir, train_steps="6", checkpoint__save_interval="100")])
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "training source train_shards: 4 shards, 128 samples; dealt to 1 stream by sample (data.sampling=epochs)" in log
    assert "data.eval_shards: 1 shard, 40 samples" in log
    assert f"--resume auto skips {partial}: it has no megamm_complete.json, so its save did not finish" in log
    assert f"The first save moves it, with any later tag, to {run_dir / 'checkpoints' / 'abandoned'}/" in log
    assert f"resumed from {run_dir / 'checkpoints' / 'global_step4'} at step 4" in log
    assert "later checkpoints in checkpoint.dir (global_step6) belong to an abandoned line" in log
    assert "resuming with changed settings: " in log and "train_steps 4 -> 6" in log
    assert (partial / "megamm_complete.json").is_file(), "the final save at step 6 did not write a new tag"
    moved = list((run_dir / "checkpoints" / "abandoned").glob("resumed-at-step4-*/global_step6"))
    assert len(moved) == 1 and (moved[0] / "mp_rank_00_model_states.pt").read_bytes() == b"cut short"


def test_checkpoint_from_before_a_new_setting_resumes_at_its_default(
    data: dict[str, str], finished_run: Path, tmp_path: Path
) -> None:
    """A checkpoint written before model.dropout, parallel.sequence_parallel and data.global_batches
    existed records none of them; they count at their defaults (what that megamm did), not as changes."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    marker_path = run_dir / "checkpoints" / "global_step4" / "megamm_complete.json"
    marker = json.loads(marker_path.read_text())
    for section, key in (("model", "dropout"), ("model", "attention_dropout"), ("parallel", "sequence_parallel"),
                         ("data", "global_batches")):
        del marker["config"][section][key]
    marker_path.write_text(json.dumps(marker))
    result = pretrain(["--config", "clip_tiny", *overrides(data, run_dir, train_steps="5", checkpoint__save_interval="100")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in result.stderr and "model.dropout" not in result.stderr


def test_help_names_only_existing_recipes() -> None:
    result = subprocess.run([sys.executable, PRETRAIN, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    named = set(re.findall(r"--config ([a-z_]+)", result.stdout))
    assert named and "tiny" in named, result.stdout
    missing = [name for name in named if not (ROOT / "megamm" / "configs" / f"{name}.yaml").is_file()]
    assert not missing, f"--help names recipes that do not exist: {missing}"


# ----------------------------------------------------------------------------------------------
# Two runs on one checkpoint.dir


def _start(args: list[str], log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, PRETRAIN, *args], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_for(condition, timeout: float, what: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the first run exited early:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.2)


def test_second_run_is_refused_while_the_first_lives_and_proceeds_after_kill_9(
    data: dict[str, str], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    lock = run_dir / "checkpoints" / LOCK
    first_log = tmp_path / "first.log"
    first = _start(["--config", "clip_tiny", *overrides(data, run_dir, train_steps="1000000",
                                                   checkpoint__save_interval="2")], first_log)
    try:
        _wait_for(lambda: "saved checkpoint" in first_log.read_text(), 180, "a checkpoint", first, first_log)
        first.send_signal(signal.SIGSTOP)  # keep its checkpoints still while the second run tries
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        before = digest(run_dir)

        second = pretrain(["--config", "clip_tiny", *overrides(data, run_dir, train_steps="4")])
        _assert_refused(second, "checkpoint.dir ", str(run_dir / "checkpoints"), f"PID {first.pid}", socket.gethostname())
        assert digest(run_dir) == before

        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        restarted = pretrain(["--config", "clip_tiny", *overrides(data, run_dir, train_steps="4")])
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        assert f"PID {first.pid}" in restarted.stderr, "the takeover of the dead run's lock is not logged"
        assert not lock.exists()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()


def test_a_run_whose_lock_is_taken_over_stops_before_its_next_save(data: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    lock = run_dir / "checkpoints" / LOCK
    log_path = tmp_path / "run.log"
    process = _start(["--config", "clip_tiny", *overrides(data, run_dir, train_steps="1000000")], log_path)
    try:
        _wait_for(lambda: "saved checkpoint" in log_path.read_text(), 180, "a checkpoint", process, log_path)
        process.send_signal(signal.SIGSTOP)
        seen = len(log_path.read_text())
        other = {**json.loads(lock.read_text()), "host": "node-7", "pid": 4242, "token": "0" * 32}
        lock.write_text(json.dumps(other))  # another node's run took the directory over
        process.send_signal(signal.SIGCONT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    after = log_path.read_text()[seen:]
    assert process.returncode == 1, after[-3000:]
    assert "[rank0] FAILED: LockLost: " in after and "PID 4242 on host node-7" in after, after[-3000:]
    assert after.count("saved checkpoint") <= 1, "it kept saving into a directory another run holds"
    assert json.loads(lock.read_text())["token"] == "0" * 32, "it removed the new holder's lock"


# ----------------------------------------------------------------------------------------------
# Under the deepspeed launcher


def test_port_in_use_under_the_launcher_is_named(data: dict[str, str], tmp_path: Path, listener: int) -> None:
    command = deepspeed_command(2, ["--config", "clip_tiny", *overrides(data, tmp_path / "run")])
    command[command.index("--master_port") + 1] = str(listener)
    result = run(command, tmp_path / "launch.log", timeout=300)
    assert result.returncode == 2, result.stdout[-3000:]
    assert f"MASTER_PORT={listener} on MASTER_ADDR=127.0.0.1 is already in use" in result.stdout
    assert "--master_port" in result.stdout and "Traceback" not in result.stdout
    assert not (tmp_path / "run").exists()


def test_a_failing_rank_is_named_first_and_the_job_fails(data: dict[str, str], tmp_path: Path) -> None:
    from megamm.config import DataConfig
    from megamm.data.streams import Source, epoch_pieces

    shards = tmp_path / "train"
    shards.mkdir()
    originals = sorted(Path(data["data.train_shards"]).glob("*.tar"))  # copied without their index:
    dealt = Source(tuple(str(p) for p in originals))  # each epoch deals the shuffled shards out whole
    rank1 = {p.shard for p in epoch_pieces(dealt, 0, 0, stream=1, streams=2, seed=DataConfig().seed, mode="epochs")}
    for index, source in enumerate(originals):
        if index not in rank1:
            shutil.copy(source, shards / source.name)
        else:  # data-parallel rank 1 of 2 reads these in its first epoch: only bad samples
            write_bad_shard(shards / source.name, 16)
    args = ["--config", "clip_tiny", *overrides(data, tmp_path / "run", data__train_shards=str(shards))]
    result = run(deepspeed_command(2, args), tmp_path / "launch.log", timeout=300)
    assert result.returncode != 0, result.stdout[-3000:]
    lines = result.stdout.splitlines()
    first_error = next(line for line in lines if re.search(r"(?i)error|failed|traceback", line))
    assert first_error.startswith("[rank1] FAILED: RuntimeError: data stream 1"), first_error
    assert "hold no usable samples" in first_error and "data.train_shards" in first_error
    peer_tracebacks = [line for line in lines if line.startswith("[rank0]") and "Traceback" in line]
    assert not peer_tracebacks and "Connection closed by peer" not in "\n".join(
        line for line in lines if "stopped: another rank failed" not in line
    ), result.stdout[-3000:]
    assert len(lines) < 120, f"{len(lines)} lines of output"


FINETUNE = str(ROOT / "launchers/finetune.py")


@pytest.mark.parametrize(
    "case, args, fragments",
    [
        ("same-dirs", [], ["checkpoint.dir=", "is the source run's; give the fine-tuning run its own",
                           "logging.tensorboard_dir="]),
        ("other-model", ["model.embed_dim=32", "OWN_DIRS"], ["the model differs (model.embed_dim 64 -> 32)"]),
        ("shards-twice", ["--data_path", "x.tar", "data.train_shards=y.tar", "OWN_DIRS"],
         ["--data_path and data.train_shards= both name the shards"]),
        ("torn-source", ["TORN", "OWN_DIRS"], ["not a complete megamm checkpoint (its save did not finish"]),
        ("no-source", ["--from", "/nonexistent/run", "OWN_DIRS"], ["not a complete megamm checkpoint (no such directory)"]),
    ],
)
def test_finetune_refuses_what_the_weights_cannot_serve(
    finished_run: Path, tmp_path: Path, case: str, args: list[str], fragments: list[str]
) -> None:
    source = finished_run / "checkpoints"
    torn = tmp_path / "torn" / "global_step4"
    shutil.copytree(source / "global_step4", torn)
    (torn / "megamm_complete.json").unlink()
    own = [f"checkpoint.dir={tmp_path / 'ft' / 'checkpoints'}", f"logging.tensorboard_dir={tmp_path / 'ft' / 'tb'}"]
    placeholders = {"OWN_DIRS": own, "TORN": ["--from", str(torn)]}
    expanded = [] if {"--from", "TORN"} & set(args) else ["--from", str(source)]
    for arg in args:
        expanded += placeholders.get(arg, [arg])
    before = digest(finished_run, tmp_path / "ft")
    _assert_refused(pretrain(expanded, timeout=120, script=FINETUNE), *fragments)
    assert digest(finished_run, tmp_path / "ft") == before


def test_finetune_at_another_image_size_resizes_the_positions(finished_run: Path, tmp_path: Path) -> None:
    """model.image.image_size is the one model field fine-tuning may change: the image embedding's
    learned positions are interpolated to the new patch grid (32 -> 48 pixels, patches of 4: 8 x 8 -> 12 x 12)."""
    own = [f"checkpoint.dir={tmp_path / 'ft' / 'checkpoints'}", f"logging.tensorboard_dir={tmp_path / 'ft' / 'tb'}"]
    args = ["--from", str(finished_run / "checkpoints"), "model.image.image_size=48", "data.image_size=48", "train_steps=1", *own]
    result = pretrain(args, timeout=120, script=FINETUNE)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "64 saved positions resized to a 12 x 12 patch grid" in log, log[-3000:]
    assert (tmp_path / "ft" / "checkpoints" / "global_step1" / "megamm_complete.json").is_file()


# ----------------------------------------------------------------------------------------------
# The data must carry what the model reads


def _strip(source: Path, target: Path, drop: str) -> Path:
    """A copy of shard ``source`` without its members ending in ``drop`` (``.wav``, ``.qa.json``)."""
    import tarfile

    with tarfile.open(source) as reader, tarfile.open(target, "w") as writer:
        for member in reader.getmembers():
            if not member.name.endswith(drop):
                writer.addfile(member, reader.extractfile(member))
    return target


@pytest.mark.parametrize(
    "drop, fragments",
    [(".wav", ("model.audio.enabled=true", "has a wav")), (".qa.json", ("model.objectives.vqa", "has a qa.json"))],
    ids=["no-audio", "no-questions"],
)
def test_model_reading_what_the_data_lacks_is_refused(data: dict[str, str], tmp_path: Path, drop: str, fragments) -> None:
    """The whole model on evaluation data without sounds (or questions) is refused before any
    process starts, naming the field and the way out; the same data passes once the model does
    not read them."""
    from megamm.config import ConfigError, load_config
    from megamm.data import Tokenizer
    from megamm.preflight import check_data

    shard = sorted(Path(data["data.eval_shards"]).glob("*.tar"))[0]
    stripped = _strip(shard, tmp_path / "shard-000000.tar", drop)
    values = {**data, "data.eval_shards": str(stripped)}
    config = load_config("tiny", [f"{key}={value}" for key, value in values.items()])
    tokenizer = Tokenizer(data["data.tokenizer"])
    with pytest.raises(ConfigError) as error:
        check_data(config, 1, tokenizer)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)
    off = ["model.audio.enabled=false", "model.objectives.audio_text=0", "model.objectives.image_audio=0"]
    if drop == ".qa.json":
        off = ["model.objectives.vqa=0", "model.objectives.vqa_generative=0"]
    check_data(load_config("tiny", [f"{key}={value}" for key, value in values.items()] + off), 1, tokenizer)
