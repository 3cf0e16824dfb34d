"""Preemption of a `deepspeed` launcher run: SIGTERM to the runner, a checkpoint inside the
launcher's 30 s grace window, and a rerun that ends where an uninterrupted run ends.

TP=1 x DP=2 under ZeRO-3, one DataLoader worker per rank (the launcher signals the workers too).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import torch

from tests.launch import ROOT, deepspeed_command, kill_group, overrides, run, tensorboard_events

STEPS = 16


def _args(data: dict[str, str], run_dir: Path, **changes: str) -> list[str]:
    common = dict(train_steps=str(STEPS), checkpoint__save_interval="100", logging__log_interval="1", **changes)
    return ["--config", "clip_tiny", *overrides(data, run_dir, **common)]


def _wait_for_group_exit(group: int, timeout: float) -> None:
    """Wait until no process of process group ``group`` is left (the ranks outlive the runner)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {group} still run {timeout:.0f} s after the signal")


def _start(args: list[str], log_path: Path) -> subprocess.Popen:
    """A 2-rank `deepspeed` launcher job in a session (process group) of its own, logging to ``log_path``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        return subprocess.Popen(
            deepspeed_command(2, args), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for_log(runner: subprocess.Popen, log_path: Path, pattern: str, timeout: float = 240) -> None:
    """Wait until the job's log matches ``pattern`` (fail if the job ends first)."""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log_path.read_text()):
        assert runner.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.1)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def test_preempted_launcher_run_checkpoints_in_the_grace_window_and_resumes_exactly(
    data: dict[str, str], tmp_path: Path
) -> None:
    command = deepspeed_command(2, _args(data, tmp_path / "reference"))
    reference = run(command, tmp_path / "reference.log")
    assert reference.returncode == 0, reference.stdout[-3000:]
    port = command[command.index("--master_port") + 1]
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"DeepSpeed's shm all-reduce segments outlived the run: {leaked}"

    run_dir = tmp_path / "preempted"
    log_path = tmp_path / "preempted.log"
    runner = _start(_args(data, run_dir), log_path)
    try:
        _wait_for_log(runner, log_path, r"step [4-9]/16")
        signalled = time.monotonic()
        # The job's process group, as SLURM, systemd or a terminal signal a job: on one node the
        # `deepspeed` runner itself forwards nothing, its `launch` child forwards to the ranks.
        os.killpg(runner.pid, signal.SIGTERM)
        runner.wait(timeout=90)
        _wait_for_group_exit(runner.pid, timeout=60)
        stopped_after = time.monotonic() - signalled
    finally:
        kill_group(runner)
    output = log_path.read_text()
    match = re.search(r"preempted: stopped by SIGTERM after step (\d+); the checkpoint (\S+) holds it", output)
    assert match, output[-4000:]
    step = int(match.group(1))
    assert 4 <= step < STEPS and Path(match.group(2)) == run_dir / "checkpoints" / f"global_step{step}"
    assert (run_dir / "checkpoints" / f"global_step{step}" / "megamm_complete.json").is_file()
    assert stopped_after < 30, f"the save took {stopped_after:.0f} s, past the launcher's 30 s grace window"
    assert "DataLoader worker" not in output, "a loader worker died of the signal"

    rerun = run(deepspeed_command(2, _args(data, run_dir)), tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'global_step{step}'} at step {step}" in rerun.stdout

    losses = tensorboard_events(run_dir / "tensorboard", "train/loss")
    expected = tensorboard_events(tmp_path / "reference" / "tensorboard", "train/loss")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in losses.values()), losses
    assert losses == expected
    final = f"global_step{STEPS}"
    ours, theirs = _weights(run_dir / "checkpoints" / final), _weights(tmp_path / "reference" / "checkpoints" / final)
    assert ours.keys() == theirs.keys()
    worst = max((ours[name] - theirs[name]).abs().max().item() for name in ours)
    assert worst <= 1e-6, f"final weights differ by up to {worst}"


def _pids(token: str) -> list[int]:
    """PIDs of the processes whose command line holds ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if token.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def _rank_pid(run_dir: Path, local_rank: int) -> int:
    """The PID of the job's rank ``local_rank`` (not of its loader workers), found by its command line."""
    rank = [pid for pid in _pids(str(run_dir)) if f"--local_rank={local_rank}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]
    (process,) = [pid for pid in rank if _parent(pid) not in rank]
    return process


def test_a_rank_killed_with_9_ends_the_job_nonzero_and_the_rerun_resumes(data: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    args = ["--config", "clip_tiny", *overrides(data, run_dir, train_steps="100000", checkpoint__save_interval="2")]
    runner = _start(args, log_path)
    try:
        _wait_for_log(runner, log_path, "global_step4")
        victim = _rank_pid(run_dir, 1)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = runner.wait(timeout=120)
        ended_after = time.monotonic() - killed
        _wait_for_group_exit(runner.pid, timeout=60)
    finally:
        kill_group(runner)
    assert code != 0 and ended_after < 60, (code, ended_after, log_path.read_text()[-3000:])

    from megamm.engine import MARKER, latest_complete

    newest = latest_complete(run_dir / "checkpoints")
    assert newest is not None
    step = int(newest.name.removeprefix("global_step"))
    # A save cut short mid-write, as a kill during a save leaves it: files, no completion marker.
    torn = newest.with_name(f"global_step{step + 2}")
    shutil.rmtree(torn, ignore_errors=True)  # the kill may have cut this very save short already
    shutil.copytree(newest, torn)
    (torn / MARKER).unlink()
    for shard in torn.glob("*_optim_states.pt"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rerun = run(deepspeed_command(2, ["--config", "clip_tiny", *overrides(data, run_dir, train_steps=str(step + 2))]),
                tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert f"resumed from {newest} at step {step}" in rerun.stdout, "--resume auto must pass over the torn tag"
    assert f"--resume auto skips {torn}" in rerun.stdout
    assert (run_dir / "checkpoints" / f"global_step{step + 2}" / MARKER).is_file()  # saved anew, complete


def test_a_stopped_rank_ends_the_job_within_the_collective_timeout(data: dict[str, str], tmp_path: Path) -> None:
    """A hung rank (SIGSTOP: it neither works nor closes its connections) fails the job after
    parallel.collective_timeout_s (the peers' watchdog: DeepSpeed's shared-memory CPU all-reduce
    would spin forever), plus the launcher's 30 s before it SIGKILLs what ignores SIGTERM."""
    run_dir = tmp_path / "hung"
    log_path = tmp_path / "hung.log"
    timeout_s = 10
    args = ["--config", "clip_tiny", *overrides(data, run_dir, train_steps="100000", parallel__collective_timeout_s=str(timeout_s))]
    runner = _start(args, log_path)
    try:
        _wait_for_log(runner, log_path, r"step \d+/100000")
        victim = _rank_pid(run_dir, 1)
        stopped = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        code = runner.wait(timeout=timeout_s + 90)
        ended_after = time.monotonic() - stopped
    finally:
        kill_group(runner)
    output = log_path.read_text()
    assert code != 0 and ended_after < timeout_s + 30 + 20, (code, ended_after, output[-3000:])
    # Whichever notices first says so: the watchdog, or a gloo collective's own timeout (the same
    # setting), depending on whether rank 0 waits in DeepSpeed's shared-memory all-reduce or in gloo.
    # The watchdog names what rank 0 was doing: a training step, or a step's checkpoint (saves are
    # every 2 steps here, and the rank may be stopped during one).
    assert re.search(
        rf"\[rank0\] FAILED: (no progress for {timeout_s} s while (training step|saving the checkpoint of step)"
        r"|a collective timed out waiting for another rank)", output
    ), output[-3000:]


def test_a_disk_that_fills_during_a_save_keeps_the_previous_checkpoint(data: dict[str, str], tmp_path: Path) -> None:
    """checkpoint.dir on a 4 MiB filesystem: the first save (~3 MiB) fits, the second does not."""
    run_dir = tmp_path / "full"
    checkpoints, kept = run_dir / "checkpoints", tmp_path / "kept"
    checkpoints.mkdir(parents=True)
    command = deepspeed_command(2, ["--config", "clip_tiny", *overrides(data, run_dir)])  # saves at steps 2 and 4
    # A private mount namespace: the small filesystem exists for this job only; what it holds at
    # the end is copied out for the checks below.
    script = 'mount -t tmpfs -o size=4m megamm-test "$1" && shift 2 && "$@"; code=$?; cp -a "$0/." "$KEPT/"; exit $code'
    result = run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c",
         script.replace("$KEPT", str(kept)), str(checkpoints), str(checkpoints), "--", *command],
        tmp_path / "full.log",
    )
    assert result.returncode != 0, result.stdout[-3000:]
    failure = [line for line in result.stdout.splitlines() if "FAILED: saving checkpoint global_step4 failed" in line]
    assert len(failure) == 1, result.stdout[-3000:]  # said once, by rank 0
    assert "The filesystem of" in failure[0] and "is full" in failure[0]
    assert "the previous checkpoint global_step2 is intact" in failure[0]
    assert sorted(path.name for path in kept.glob("global_step*")) == ["global_step2"], "the partial tag stays"
    assert (kept / "global_step2" / "megamm_complete.json").is_file() and (kept / "latest").read_text() == "global_step2"

    from megamm.engine import load_model_weights

    assert load_model_weights(kept / "global_step2", tp_rank=0)  # the surviving checkpoint loads
