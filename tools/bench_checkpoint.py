#!/usr/bin/env python
"""Checkpoint benchmark: megamm's ZeRO-3 save and load against the raw speed of the same disk.

One job of 2 ranks (the real ``deepspeed`` launcher on 127.0.0.1, gloo on CPU) builds megamm's
``MultiModalTransformer`` at about ``--params`` parameters (both towers ``hidden`` wide and
``hidden / 85`` deep, heads of 64, on the ``clip_tiny`` recipe), wraps it with
``megamm.engine.build_engine`` under ZeRO-3 at DP=2 with megamm's DeepSpeed config builder, trains
on random batches of the model's input shapes, and saves and loads with
``megamm.engine.save_checkpoint`` / ``load_checkpoint``: the code path of training (DeepSpeed's
files, then the completion marker).

Each of ``--repeats`` rounds, in the same job and the same directory:

1. ``--save-every`` K timed training steps; the checkpoint is saved right after step K. The stall
   a periodic save causes is step K plus its save, against a normal step (steps 1..K-1);
2. the save is timed as training runs it: DeepSpeed ``torch.save``s each rank's files, megamm
   fsyncs each one, then writes its marker (fsynced, under 2 KB): on return the checkpoint is on
   disk. Right after, each rank fsyncs the files it wrote once more, timed apart (a check that
   nothing was left to flush: it should cost next to nothing);
3. the files are evicted from the page cache (``posix_fadvise DONTNEED``), the fp32 master
   weights zeroed, and the checkpoint loaded (timed) and checked to have restored them;
4. the raw disk baseline in the same directory: the checkpoint's bytes written in ``--block-mb``
   blocks, as one file by rank 0 (the other waits) and as one file per rank at once (each its
   own share, as the save writes), without and with fsync, then read back from disk.

Every transfer starts right after a training step, as a periodic save does. On a virtual
machine that hands freed memory back to its host within seconds (this one), the speed of writing
into the page cache depends on what ran just before: right after a training step it is several
times slower than into memory just used (~0.5 against ~4 GB/s for one writer here), so the save
and its baselines are only comparable when the same thing precedes each of them.

Where the save's time goes is measured in the same saves: megamm's calls into DeepSpeed are
wrapped (state-dict building, each ``torch.save`` with its file and bytes, the marker; barriers
are the remainder). ``--diagnose`` adds, on both ranks at once, torch.save of each rank's
optimizer state to /dev/null and to a file, with and without torch's CRC32.

    python tools/bench_checkpoint.py --params 300M --repeats 3 --diagnose --out docs/benchmarks/checkpoint

Results: ``results.md`` (printed too), ``results.json``, ``throughput.png`` and ``logs/job.log``
under ``--out``. The checkpoints go to a temporary directory under ``--workdir``, removed at the
end unless ``--keep``. MB are 10^6 bytes; a ratio divides mean MB/s by the baseline's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamm.config import TrainConfig, load_config  # noqa: E402
from tools.jobs import run_launch  # noqa: E402

RANKS = 2
MB = 1e6
HEAD_DIM = 64
LAYERS_PER_WIDTH = 85.0
"""hidden / layers of the chosen shapes (1024 wide, 12 deep at 300M, as BERT-large's towers)."""
ROWS = (
    "raw_write", "raw_write_ranks", "save",
    "raw_write_fsync", "raw_write_fsync_ranks", "save_fsync",
    "raw_read", "raw_read_ranks", "load",
)  # fmt: skip
"""Measured transfers, in groups of three: the checkpoint's bytes over each one's seconds."""
LABELS = {
    "raw_write": "raw write, 1 file, no fsync",
    "raw_write_ranks": "raw write, 1 file per rank at once, no fsync",
    "save": "**megamm save** (as in training: durable, every file fsynced before the marker)",
    "raw_write_fsync": "raw write + fsync, 1 file",
    "raw_write_fsync_ranks": "raw write + fsync, 1 file per rank at once",
    "save_fsync": "**megamm save + fsync** of every file again (a check: nothing left to flush)",
    "raw_read": "raw read, 1 file, from disk",
    "raw_read_ranks": "raw read, 1 file per rank at once, from disk",
    "load": "**megamm load**, from disk",
}
SHORT = {
    "raw_write": "raw write\n1 file", "raw_write_ranks": "raw write\nfile per rank", "save": "save",
    "raw_write_fsync": "raw write+fsync\n1 file", "raw_write_fsync_ranks": "raw write+fsync\nfile per rank",
    "save_fsync": "save+fsync", "raw_read": "raw read\n1 file", "raw_read_ranks": "raw read\nfile per rank",
    "load": "load",
}  # fmt: skip
BASELINES = {
    "save": ("raw_write_fsync", "raw_write_fsync_ranks"),  # the save is durable: compare with durable writes
    "save_fsync": ("raw_write_fsync", "raw_write_fsync_ranks"),
    "load": ("raw_read", "raw_read_ranks"),
}
"""Each megamm transfer's raw-disk baselines: one file from rank 0, one file per rank at once."""
REMAINDER = "barriers (waiting for the other rank), DeepSpeed's bookkeeping"
TARGET_RATIO = 0.5


# ----------------------------------------------------------------------------------------------
# Model size


def parse_count(text: str) -> int:
    """``300M`` -> 300_000_000; ``5m``, ``1.5G``, ``800K`` and plain integers too."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count like 300M, 5M or 800K")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def shape_overrides(hidden: int, layers: int) -> list[str]:
    """Config overrides giving both towers ``hidden`` width (heads of 64) and ``layers`` depth."""
    heads = max(1, hidden // HEAD_DIM)
    return [
        f"model.{tower}.{key}={value}"
        for tower in ("text", "image")
        for key, value in (("hidden_size", hidden), ("num_layers", layers), ("num_heads", heads))
    ]


def count_parameters(config: TrainConfig) -> int:
    """Parameters of megamm's model for ``config`` (built on the meta device: no memory, no init cost)."""
    from megamm.model import MultiModalTransformer

    with torch.device("meta"):
        model = MultiModalTransformer(config.model)
    return sum(p.numel() for p in model.parameters())


def choose_shape(target: int, recipe: str, overrides: list[str]) -> tuple[list[str], int]:
    """The (overrides, parameter count) of the shape nearest ``target``: widths in steps of 64,
    depth ``hidden / 85`` (at least 2)."""
    best: Optional[tuple[int, list[str], int]] = None
    for hidden in range(HEAD_DIM, 4097, HEAD_DIM):
        layers = max(2, round(hidden / LAYERS_PER_WIDTH))
        sizes = shape_overrides(hidden, layers)
        count = count_parameters(load_config(recipe, [*overrides, *sizes]))
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), sizes, count)
        if count > target:
            break
    assert best is not None
    return best[1], best[2]


# ----------------------------------------------------------------------------------------------
# Files and the raw disk


def tree_files(root: Path) -> dict[str, int]:
    """Relative path -> bytes of every regular file under ``root``."""
    return {str(path.relative_to(root)): path.stat().st_size for path in sorted(root.rglob("*")) if path.is_file()}


def fsync_paths(paths: list[Path]) -> None:
    """fsync each file or directory in ``paths``."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(paths: list[Path]) -> None:
    """Drop these (already fsynced, so clean) files from the page cache: the next read is from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(path: Path, nbytes: int, block: bytes, fsync: bool) -> None:
    """Write ``nbytes`` to a new file in ``block``-sized writes, with an fsync at the end if asked."""
    view = memoryview(block)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, view[: min(left, len(view))])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path, block_size: int) -> None:
    """Read ``path`` to its end in ``block_size`` reads into one buffer."""
    buffer = bytearray(block_size)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


# ----------------------------------------------------------------------------------------------
# Where a save's time goes


@dataclass
class SaveProfile:
    """Seconds spent in each part of megamm's save on this rank, and the bytes of each file written."""

    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    def reset(self) -> None:
        self.seconds, self.files = {}, {}


def _timed(profile: SaveProfile, part: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            profile.add(part, time.perf_counter() - start)

    return wrapper


def _file_kind(path: str) -> str:
    """``torch.save optim_states``, ``torch.save model_states``: the part of the save writing ``path``."""
    name = Path(path).name
    kind = next((kind for kind in ("optim_states", "model_states") if kind in name), name)
    return f"torch.save {kind}"


def _wrap(owner: Any, name: str, profile: SaveProfile, part: str) -> None:
    """Time ``owner.name`` as ``part`` if it exists (else its time stays in the remainder)."""
    if callable(getattr(owner, name, None)):
        setattr(owner, name, _timed(profile, part, getattr(owner, name)))


def instrument(engine: Any, profile: SaveProfile) -> None:
    """Wrap the parts of megamm's save path on this rank so that ``profile`` accumulates their time.

    DeepSpeed's ``torch.save`` calls (per file, with the bytes written), ZeRO-3's optimizer
    state dict (fp32 master partition + Adam moments, by reference) and the module's state dict,
    the copy of DeepSpeed's recovery script, megamm's marker (atomic, fsynced) and its pruning.
    The rest of a save is barriers (waiting for the slower rank) and DeepSpeed's bookkeeping.
    """
    import megamm.engine.checkpoint as checkpoint

    checkpoint_engine = engine.checkpoint_engine
    original_save = checkpoint_engine.save

    def save(state_dict: Any, path: str) -> Any:
        start = time.perf_counter()
        result = original_save(state_dict, path)
        profile.add(_file_kind(path), time.perf_counter() - start)
        profile.files[Path(path).name] = os.path.getsize(path)
        return result

    checkpoint_engine.save = save
    _wrap(engine.optimizer, "state_dict", profile, "ZeRO-3 optimizer state_dict")
    _wrap(engine, "module_state_dict", profile, "module state_dict")
    _wrap(engine, "_copy_recovery_script", profile, "copy zero_to_fp32.py")
    _wrap(checkpoint, "_write_json_atomic", profile, "megamm marker (fsynced)")
    _wrap(checkpoint, "_prune", profile, "megamm prune")


# ----------------------------------------------------------------------------------------------
# The job (runs on every rank)


def random_batch(config: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A micro batch of the model's input shapes: random pixels, token ids and caption lengths."""
    batch, image, text = config.micro_batch_size, config.model.image, config.model.text
    pixels = torch.randn(batch, image.channels, image.image_size, image.image_size, generator=generator)  # (B, C, S, S)
    ids = torch.randint(0, text.vocab_size, (batch, text.max_length), generator=generator)  # (B, T)
    lengths = torch.randint(3, text.max_length + 1, (batch, 1), generator=generator)  # (B, 1)
    mask = torch.arange(text.max_length)[None, :] < lengths  # (B, T) bool
    return pixels, ids, mask


def train_step(engine: Any, batch: tuple[torch.Tensor, ...]) -> float:
    """One optimizer step as megamm's Trainer takes it; returns seconds."""
    from megamm.engine import clamp_parameters

    start = time.perf_counter()
    loss = engine(*batch)["loss"]
    engine.backward(loss)
    engine.step()
    clamp_parameters(engine)
    return time.perf_counter() - start


def master_fingerprint(engine: Any) -> float:
    """A checksum of this rank's fp32 master partitions (every 997th element, in float64)."""
    return float(sum(flat[::997].double().sum() for flat in engine.optimizer.fp32_partitioned_groups_flat))


def zero_masters(engine: Any) -> None:
    """Overwrite this rank's fp32 master partitions, so that only a real load restores them."""
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        flat.data.zero_()


def rss_gb() -> float:
    """This process's resident memory now, GB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def max_rss_gb() -> float:
    """This process's peak resident memory so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def collective_seconds(work: Callable[[], Any]) -> float:
    """Seconds from a barrier before ``work`` (run on every rank) to a barrier after it."""
    _barrier()
    start = time.perf_counter()
    work()
    _barrier()
    return time.perf_counter() - start


@dataclass
class Job:
    """What every rank holds: the engine, its config, the save profile, the step counter."""

    engine: Any
    config: TrainConfig
    marker: dict[str, Any]
    profile: SaveProfile
    rank: int
    block: bytes
    """The raw baseline's write buffer (incompressible, in case the disk compresses)."""
    step: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)

    def steps(self, count: int) -> list[float]:
        """``count`` timed training steps on random batches; their seconds."""
        seconds = []
        for _ in range(count):
            seconds.append(train_step(self.engine, random_batch(self.config, self.generator)))
            self.step += 1
        return seconds

    def save(self, directory: Path) -> tuple[float, Path]:
        """megamm's save of the current step into ``directory``; (seconds, checkpoint path)."""
        from megamm.config import to_dict
        from megamm.engine import save_checkpoint

        client_state = {"train_state": {"step": self.step}, "config": to_dict(self.config)}
        self.profile.reset()
        _barrier()
        start = time.perf_counter()
        path = save_checkpoint(self.engine, directory, self.step, client_state, keep_last=10**6, marker=self.marker)
        return time.perf_counter() - start, path

    def load(self, path: Path, saved: tuple[int, float]) -> tuple[float, bool]:
        """megamm's load of ``path``, saved at (step, master fingerprint) ``saved``; training
        continues from it. Returns (seconds, whether it restored the step and master weights)."""
        from megamm.engine import load_checkpoint

        zero_masters(self.engine)
        state: dict[str, Any] = {}
        seconds = collective_seconds(lambda: state.update(load_checkpoint(self.engine, path)))
        self.step = state["train_state"]["step"]
        return seconds, (self.step, master_fingerprint(self.engine)) == saved


def build_job(args: argparse.Namespace) -> Job:
    """Every rank: the process group, megamm's model under ZeRO-3, its DeepSpeed engine."""
    from megamm.config import to_dict
    from megamm.engine import build_ds_config, build_engine, init_distributed, load_template
    from megamm.model import MultiModalTransformer
    from megamm.parallel import ParallelState
    from megamm.preflight import parallel_layout

    config = load_config(args.config, args.overrides)
    init_distributed()
    parallel = ParallelState.initialize(1, 1)
    ds_config = build_ds_config(load_template(args.ds_config), config, parallel.dp_size)
    if ds_config["zero_optimization"]["stage"] != 3:
        raise SystemExit(f"expected ZeRO-3, the DeepSpeed config runs stage {ds_config['zero_optimization']['stage']}")
    torch.manual_seed(config.seed)
    model = MultiModalTransformer(config.model, parallel)
    engine = build_engine(model, config.optim, config.train_steps, ds_config, parallel)
    del model
    marker = {**parallel_layout(parallel.world_size, 1, parallel.dp_size), "config": to_dict(config)}
    profile = SaveProfile()
    instrument(engine, profile)
    job = Job(engine, config, marker, profile, parallel.rank, os.urandom(args.block_mb * 2**20))
    job.generator.manual_seed(config.seed * 1000 + parallel.rank)
    return job


def rank_paths(directory: Path, written: list[dict[str, int]], rank: int) -> list[Path]:
    """What ``rank`` fsyncs of a checkpoint: the files its torch.save wrote; rank 0 also every
    other file (marker, ``latest``, DeepSpeed's script) and the directories."""
    others = {name for r, files in enumerate(written) if r != rank for name in files}
    if rank != 0:
        return [path for path in directory.rglob("*") if path.name in written[rank]]
    paths = sorted(directory.rglob("*"))
    return [p for p in paths if p.is_file() and p.name not in others] + [p for p in paths if p.is_dir()] + [directory]


def timed_transfer(job: Job, work: Callable[[], Any]) -> float:
    """A training step, then ``work`` (run on every rank) timed from a barrier to a barrier.

    Every transfer follows a training step, as a periodic save does: on a virtual machine that
    hands freed memory back to its host, what ran just before sets the speed of writing into the
    page cache (see the module's docstring).
    """
    job.steps(1)
    return collective_seconds(work)


def raw_transfers(job: Job, directory: Path, shares: list[int]) -> dict[str, float]:
    """The raw disk baseline: the checkpoint's bytes as one file written by rank 0 and as one file
    per rank at once (``shares``), each without and with fsync, and read back from disk."""
    seconds: dict[str, float] = {}
    total = sum(shares)
    for suffix, nbytes in (("", total if job.rank == 0 else 0), ("_ranks", shares[job.rank])):
        path = directory / f"raw-disk-baseline-rank{job.rank}.bin"
        for fsync in (False, True):
            name = ("raw_write_fsync" if fsync else "raw_write") + suffix
            seconds[name] = timed_transfer(job, lambda: nbytes and raw_write(path, nbytes, job.block, fsync))
            if not fsync:
                path.unlink(missing_ok=True)
        if nbytes:
            evict([path])
        seconds["raw_read" + suffix] = timed_transfer(job, lambda: nbytes and raw_read(path, len(job.block)))
        path.unlink(missing_ok=True)
    return seconds


def checkpoint_shares(directory: Path, written: list[dict[str, int]], rank: int) -> tuple[dict[str, int], list[int]]:
    """(every file of the checkpoint on rank 0, else {}; each rank's bytes, rank 0 counting all
    files no other rank wrote). Collective."""
    files = tree_files(directory) if rank == 0 else {}
    shares = [sum(f.values()) for f in written]
    shares[0] = sum(files.values()) - sum(shares[1:])
    return files, _gather(shares)[0]  # rank 0's: it listed the checkpoint


def one_repeat(job: Job, directory: Path, save_every: int, keep: bool) -> dict[str, Any]:
    """Steps with a save after the last, fsync, load, the raw disk baseline; the repeat's record."""
    if job.rank == 0:
        os.sync()  # no dirty pages of anything earlier
    _barrier()
    step_seconds = job.steps(save_every)
    seconds: dict[str, float] = {}
    seconds["save"], path = job.save(directory)  # right after step K
    saved = (job.step, master_fingerprint(job.engine))
    written = _gather(dict(job.profile.files))
    profile = {"seconds": dict(job.profile.seconds), "files": dict(job.profile.files), "total": seconds["save"]}
    seconds["fsync_after_save"] = collective_seconds(lambda: fsync_paths(rank_paths(directory, written, job.rank)))
    files, shares = checkpoint_shares(directory, written, job.rank)
    if job.rank == 0:
        evict([directory / name for name in files])
    job.steps(1)
    seconds["load"], restored = job.load(path, saved)
    if job.rank == 0 and not keep:
        shutil.rmtree(directory)
    seconds.update(raw_transfers(job, directory.parent, shares))
    ranks = _gather({"steps": step_seconds, "profile": profile, "restored": restored})
    return {
        "saved_step": saved[0],
        "checkpoint_dir": str(directory),
        "checkpoint": str(path),
        "bytes": sum(shares),
        "rank_bytes": shares,
        "files": files,
        "seconds": seconds,
        "step_seconds": [max(r["steps"][i] for r in ranks) for i in range(save_every)],  # the slower rank
        "profile": [r["profile"] for r in ranks],
        "load_restored": all(r["restored"] for r in ranks),
    }


def diagnose(job: Job, directory: Path) -> dict[str, float]:
    """Every rank at once serialises its ZeRO optimizer state (what its optim_states file holds)
    to /dev/null and to a file, with torch's CRC32 (the default, as the save) and without; seconds."""
    import torch.serialization as serialization

    state = {"optimizer_state_dict": job.engine.optimizer.state_dict()}
    target = directory / f"diagnose-rank{job.rank}.pt"
    seconds: dict[str, float] = {}
    default = serialization.get_crc32_options()
    try:
        for name, path, crc32 in (
            ("to /dev/null, CRC32", "/dev/null", True),
            ("to /dev/null, no CRC32", "/dev/null", False),
            ("to a file, CRC32 (as the save)", str(target), True),
            ("to a file, no CRC32", str(target), False),
        ):
            serialization.set_crc32_options(crc32)
            if job.rank == 0:
                os.sync()
            seconds[name] = timed_transfer(job, lambda: torch.save(state, path))
            target.unlink(missing_ok=True)
    finally:
        serialization.set_crc32_options(default)
        target.unlink(missing_ok=True)
    return seconds


def worker_main(args: argparse.Namespace) -> None:
    """The job's body on every rank; rank 0 writes the result file."""
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if args.no_crc32:
        torch.serialization.set_crc32_options(False)
    job = build_job(args)
    memory = {"after build": rss_gb(), "peak during build": max_rss_gb()}
    workdir = Path(args.run_dir)
    job.steps(args.warmup)
    memory["after warm-up"] = rss_gb()
    repeats = []
    for repeat in range(args.repeats):
        record = one_repeat(job, workdir / f"repeat{repeat}", args.save_every, args.keep)
        repeats.append(record)
        if job.rank == 0:
            seconds = record["seconds"]
            print(
                f"[bench] repeat {repeat}: {record['bytes'] / MB:.1f} MB, save {seconds['save']:.2f} s "
                f"(+ fsync {seconds['fsync_after_save']:.2f} s), load {seconds['load']:.2f} s, raw write "
                f"{seconds['raw_write']:.2f} s (1 file) {seconds['raw_write_ranks']:.2f} s (per rank), "
                f"step {statistics.mean(record['step_seconds'][:-1]):.2f} s, RSS {rss_gb():.1f} GB (peak {max_rss_gb():.1f})",
                flush=True,
            )
    diagnostics = diagnose(job, workdir) if args.diagnose else {}
    memory.update({"at the end": rss_gb(), "peak": max_rss_gb()})
    ranks = _gather({"diagnose": diagnostics, "rss_gb": memory, "max_rss_gb": max_rss_gb()})
    if job.rank == 0:
        result = {"repeats": repeats, "ranks": ranks, "world_size": RANKS, "params": args.param_count}
        Path(args.result).write_text(json.dumps(result, indent=1))
    _barrier()


# ----------------------------------------------------------------------------------------------
# The parent: launch the job, summarise, print and write


def _worker_command(args: argparse.Namespace, run_dir: Path, result: Path, port: int, overrides: list[str]) -> list[str]:
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(RANKS)]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    script = [str(ROOT / "tools/bench_checkpoint.py"), "--worker", "--result", str(result), "--run-dir", str(run_dir)]
    script += ["--config", args.config, "--ds-config", args.ds_config, "--repeats", str(args.repeats)]
    script += ["--save-every", str(args.save_every), "--warmup", str(args.warmup), "--block-mb", str(args.block_mb)]
    script += ["--param-count", str(args.param_count)]
    script += ["--keep"] if args.keep else []
    script += ["--no-crc32"] if args.no_crc32 else []
    script += ["--diagnose"] if args.diagnose else []
    return [*launcher, *script, *overrides]


def run_job(args: argparse.Namespace, run_dir: Path, log_path: Path, overrides: list[str]) -> Optional[dict[str, Any]]:
    """Launch the 2-rank job in a session of its own; stop its process group by PID however it ends."""
    from megamm.engine import free_port

    result = run_dir / "result.json"
    port = free_port("127.0.0.1")
    command = _worker_command(args, run_dir, result, port, overrides)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    returncode = run_launch(command, env, log_path, args.timeout, port)
    if returncode != 0 or not result.is_file():
        print(f"the job failed with exit {returncode}; see {log_path}", file=sys.stderr)
        return None
    return json.loads(result.read_text())


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def transfer_seconds(record: dict[str, Any]) -> dict[str, float]:
    """Seconds of each measured transfer of one repeat (save + fsync: the two back to back)."""
    seconds = dict(record["seconds"])
    seconds["save_fsync"] = seconds["save"] + seconds["fsync_after_save"]
    return {row: seconds[row] for row in ROWS}


def summarise(result: dict[str, Any], save_every: int) -> dict[str, Any]:
    """Per transfer: seconds and MB/s over repeats; ratios against the baselines; the stall; the profile."""
    repeats = result["repeats"]
    per_repeat = [transfer_seconds(r) for r in repeats]
    transfers = {}
    for row in ROWS:
        seconds = [p[row] for p in per_repeat]
        rates = [r["bytes"] / MB / s for r, s in zip(repeats, seconds)]
        transfers[row] = {"seconds": seconds, "mb_per_s": rates, "seconds_stats": _stats(seconds), "mb_per_s_stats": _stats(rates)}
    ratios = {
        row: {
            base: {
                "ratio": transfers[row]["mb_per_s_stats"]["mean"] / transfers[base]["mb_per_s_stats"]["mean"],
                "per_repeat": [a / b for a, b in zip(transfers[row]["mb_per_s"], transfers[base]["mb_per_s"])],
            }
            for base in bases
        }
        for row, bases in BASELINES.items()
    }
    return {
        "bytes": [r["bytes"] for r in repeats],
        "transfers": transfers,
        "ratios": ratios,
        "stall": summarise_stall(repeats, transfers, save_every),
        "profile": summarise_profile(repeats),
        "load_restored": all(r["load_restored"] for r in repeats),
    }


def summarise_stall(repeats: list[dict[str, Any]], transfers: dict[str, Any], save_every: int) -> dict[str, Any]:
    """A normal step (steps 1..K-1 of each repeat) against step K plus its save."""
    normal = [s for r in repeats for s in r["step_seconds"][:-1]]
    saving = [r["step_seconds"][-1] + r["seconds"]["save"] for r in repeats]
    step = statistics.mean(normal)
    save, durable = (statistics.mean(transfers[row]["seconds"]) for row in ("save", "save_fsync"))
    return {
        "normal_step_s": _stats(normal),
        "saving_step_s": _stats(saving),
        "save_s": transfers["save"]["seconds_stats"],
        "save_fsync_s": transfers["save_fsync"]["seconds_stats"],
        "save_in_steps": save / step,
        "save_fsync_in_steps": durable / step,
        "save_every": save_every,
        "overhead_at_save_every": save / (save_every * step),
    }


def summarise_profile(repeats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rank: mean seconds of each part of the save, the remainder as barriers and bookkeeping."""
    ranks = []
    for rank in range(len(repeats[0]["profile"])):
        profiles = [r["profile"][rank] for r in repeats]
        parts = sorted({part for p in profiles for part in p["seconds"]})
        seconds = {part: statistics.mean(p["seconds"].get(part, 0.0) for p in profiles) for part in parts}
        total = statistics.mean(p["total"] for p in profiles)
        seconds[REMAINDER] = total - sum(seconds.values())
        ranks.append({"rank": rank, "total_s": total, "seconds": seconds, "files": profiles[0]["files"]})
    return ranks


def _fmt(stats: dict[str, float], digits: int = 3) -> str:
    spread = f" ± {stats['std']:.2g}" if stats["std"] else ""
    return f"{stats['mean']:.{digits}g}{spread} [{stats['min']:.{digits}g}, {stats['max']:.{digits}g}]"


def ratio_text(summary: dict[str, Any], row: str, base: str) -> str:
    """``**0.83x**`` (the form tests parse) or ``-`` for a baseline row."""
    ratio = summary["ratios"].get(row, {}).get(base)
    return f"**{ratio['ratio']:.2f}x**" if ratio else "-"


def render_transfers(summary: dict[str, Any]) -> str:
    """The side-by-side table: each transfer's seconds and MB/s, its ratio to the raw-disk baselines."""
    lines = [
        "| transfer | seconds, mean ± std [min, max] | MB/s, mean ± std [min, max] | ratio to 1 file | ratio to 1 file per rank |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in ROWS:
        entry = summary["transfers"][row]
        one, per_rank = (ratio_text(summary, row, base) for base in BASELINES.get(row, ("", "")))
        lines.append(f"| {LABELS[row]} | {_fmt(entry['seconds_stats'])} | {_fmt(entry['mb_per_s_stats'])} | {one} | {per_rank} |")
    return "\n".join(lines)


def render_stall(summary: dict[str, Any]) -> str:
    stall = summary["stall"]
    return (
        f"| normal step s | step + its save s | save alone s | a save costs | with a second fsync | overhead, "
        f"save every {stall['save_every']} steps |\n| --- | --- | --- | --- | --- | --- |\n"
        f"| {_fmt(stall['normal_step_s'])} | {_fmt(stall['saving_step_s'])} | {_fmt(stall['save_s'])} "
        f"| {stall['save_in_steps']:.2f} steps | {stall['save_fsync_in_steps']:.2f} steps "
        f"| {100 * stall['overhead_at_save_every']:.1f}% |"
    )


def render_profile(summary: dict[str, Any]) -> str:
    """Where the save's time goes, per rank (mean over repeats), with the MB/s of each torch.save."""
    profile = summary["profile"]
    parts = sorted({part for rank in profile for part in rank["seconds"]}, key=lambda p: -profile[0]["seconds"].get(p, 0.0))
    lines = ["| part of the save | " + " | ".join(f"rank {r['rank']} s" for r in profile) + " |"]
    lines.append("| --- |" + " --- |" * len(profile))
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{r['seconds'].get(part, 0.0):.3f}" for r in profile) + " |")
    lines.append("| **total (save_checkpoint, wall)** | " + " | ".join(f"**{r['total_s']:.3f}**" for r in profile) + " |")
    files = []
    for rank in profile:
        for name, size in rank["files"].items():
            seconds = rank["seconds"].get(_file_kind(name), 0.0)
            rate = f", {size / MB / seconds:.0f} MB/s" if seconds else ""
            files.append(f"rank {rank['rank']} `{name}` {size / MB:.1f} MB{rate}")
    return "\n".join(lines) + "\n\nWritten by torch.save: " + "; ".join(files) + "."


def render_diagnostics(result: dict[str, Any]) -> str:
    """torch.save of each rank's optimizer state to /dev/null and to a file, with and without CRC32."""
    diagnostics = [rank["diagnose"] for rank in result["ranks"]]
    if not diagnostics[0]:
        return ""
    files = result["repeats"][0]["profile"]
    sizes = [next((b for f, b in files[r]["files"].items() if "optim_states" in f), 0) for r in range(len(diagnostics))]
    lines = ["| torch.save of the optimizer state | " + " | ".join(f"rank {r} s (MB/s)" for r in range(len(sizes))) + " |"]
    lines.append("| --- |" + " --- |" * len(sizes))
    for name in diagnostics[0]:
        cells = [f"{d[name]:.3f} ({size / MB / d[name]:.0f})" for d, size in zip(diagnostics, sizes)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nBoth ranks at once, from a barrier to a barrier (so each rank's time is the slower one's)."


def machine_line() -> str:
    import deepspeed

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, torch {torch.__version__}, "
        f"DeepSpeed {deepspeed.__version__}, Python {platform.python_version()}"
    )


def filesystem(path: Path) -> str:
    """``ext4 on /dev/vda``: the filesystem holding ``path``, from /proc/mounts."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) >= len(best[0]):
                best = (mount, kind, device)
    return f"{best[1]} on {best[2]}"


def render_verdict(summary: dict[str, Any]) -> str:
    """The save's and the durable save's ratios to both raw baselines, against the target."""
    parts = []
    for row, what in (("save", "Save (durable)"), ("save_fsync", "Save and a second fsync")):
        ratios = [summary["ratios"][row][base]["ratio"] for base in BASELINES[row]]
        verdict = "meets" if min(ratios) >= TARGET_RATIO else "misses"
        parts.append(
            f"{what}: {ratios[0]:.2f}x the raw write speed of one file, {ratios[1]:.2f}x of one file per rank "
            f"({verdict} the {TARGET_RATIO}x target)."
        )
    return "**" + " ".join(parts) + "**"


def render_report(result: dict[str, Any], summary: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    bytes_mb = statistics.mean(summary["bytes"]) / MB
    rss = ", ".join(f"rank {i} {r['max_rss_gb']:.1f} GB" for i, r in enumerate(result["ranks"]))
    diagnostics = render_diagnostics(result)
    return (
        f"# Checkpoint benchmark\n\n`{command}`\n\n{time.strftime('%Y-%m-%d')}, {machine_line()}; checkpoints on "
        f"{filesystem(Path(args.workdir))}.\n\n"
        f"megamm's model at {result['params'] / 1e6:.1f}M parameters (fp32, AdamW), ZeRO-3 at DP={result['world_size']} "
        f"(the `deepspeed` launcher, 2 ranks on 127.0.0.1, gloo), micro batch {args.micro_batch} per rank, "
        f"`{' '.join(args.shape)}`. {args.repeats} repeat(s); checkpoint {bytes_mb:.1f} MB; mean ± std [min, max]; "
        f"MB = 10^6 bytes; ratios divide mean MB/s. Peak RSS: {rss}. Every load restored the master weights: "
        f"{summary['load_restored']}.\n\n{render_verdict(summary)}\n\n"
        "The save as training runs it (`megamm.engine.save_checkpoint`) is durable: each file DeepSpeed's "
        "torch.save writes is fsynced before megamm's marker (under 2 KB, fsynced too) vouches for it, so it "
        "is compared with the raw writes + fsync. `save + fsync` adds, right after, a second fsync by each rank "
        "of the files it wrote (rank 0: also the marker, `latest` and the directories), which finds nothing "
        "left to flush. The raw baselines write the "
        "checkpoint's bytes in large blocks into the same directory: as one file from rank 0, and as one file per "
        "rank at once (each rank its own share, as the save writes). Every transfer ran right after a training "
        "step, as a periodic save does. The ranks ran with "
        f"{'MALLOC_MMAP_THRESHOLD_=' + str(args.malloc_mmap_threshold) if args.malloc_mmap_threshold else 'glibc defaults'}"
        f"{' and torch.save without CRC32 (`--no-crc32`)' if args.no_crc32 else ''}."
        "\n\n"
        f"{render_transfers(summary)}\n\n## Training stall of a periodic save\n\n{render_stall(summary)}\n\n"
        f"## Where the save's time goes (mean over repeats)\n\n{render_profile(summary)}\n"
        + (f"\n## Serialisation with and without the disk\n\n{diagnostics}\n" if diagnostics else "")
    )


def plot(summary: dict[str, Any], path: Path) -> None:
    """Bars of mean MB/s (std as error bars, min and max as ticks) of every transfer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"save": "#1f77b4", "save_fsync": "#1f77b4", "load": "#1f77b4"}
    stats = [summary["transfers"][row]["mb_per_s_stats"] for row in ROWS]
    fig, ax = plt.subplots(figsize=(10.5, 4.2))
    x = list(range(len(ROWS)))
    ax.bar(x, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], capsize=4,
           color=[colours.get(row, "#aaaaaa") for row in ROWS])  # fmt: skip
    ax.scatter(x * 2, [s["min"] for s in stats] + [s["max"] for s in stats], marker="_", color="black", s=80)
    for i, row in enumerate(ROWS):
        if row in BASELINES:
            ratios = " / ".join(f"{summary['ratios'][row][base]['ratio']:.2f}x" for base in BASELINES[row])
            top = max(stats[i]["max"], stats[i]["mean"] + stats[i]["std"])
            ax.text(i, top, ratios, ha="center", va="bottom", fontsize=8)
            target = TARGET_RATIO * max(summary["transfers"][base]["mb_per_s_stats"]["mean"] for base in BASELINES[row])
            ax.plot([i - 0.45, i + 0.45], [target, target], color="red", linestyle="--", linewidth=1,
                    label=f"{TARGET_RATIO}x the faster raw baseline" if row == "save" else None)  # fmt: skip
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xticks(x, [SHORT[row] for row in ROWS], fontsize=7.5)
    ax.set_ylabel("MB/s (10^6 bytes)")
    ax.set_title(f"{statistics.mean(summary['bytes']) / MB:.0f} MB ZeRO-3 checkpoint: megamm (blue, ratio to "
                 "1 file / 1 file per rank) vs raw disk (grey)", fontsize=9)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parent_main(args: argparse.Namespace) -> int:
    args.shape, args.param_count = choose_shape(args.params, args.config, args.overrides)
    steps = args.warmup + args.repeats * (args.save_every + len(ROWS) - 2) + 4
    overrides = [*args.overrides, *args.shape, f"micro_batch_size={args.micro_batch}", f"train_steps={steps}"]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="bench_checkpoint-", dir=args.workdir)).resolve()
    print(f"model: {args.param_count / 1e6:.1f}M parameters ({' '.join(args.shape)}); working in {run_dir}", flush=True)
    try:
        result = run_job(args, run_dir, out / "logs" / "job.log", overrides)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    if result is None:
        return 1
    summary = summarise(result, args.save_every)
    command = "python tools/bench_checkpoint.py " + " ".join(sys.argv[1:])
    report = render_report(result, summary, args, command)
    print("\n" + report)
    (out / "results.md").write_text(report)
    payload = {"command": command, "machine": machine_line(), "overrides": overrides, "summary": summary, "result": result}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    plot(summary, out / "throughput.png")
    if args.keep:
        print(f"kept the checkpoints under {run_dir}")
    return 0 if summary["load_restored"] else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=parse_count, default=parse_count("300M"), help="model size, e.g. 300M, 5M")
    parser.add_argument("--config", default="clip_tiny", help="recipe name or YAML path")
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs/zero3.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=3, help="training steps per repeat; the last one saves (>= 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    parser.add_argument("--micro-batch", type=int, default=2, help="samples per rank per step")
    parser.add_argument("--block-mb", type=int, default=64, help="MiB per write() and read() of the raw disk baseline")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=2**20,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for the ranks (bytes; 0: glibc's dynamic default). A fixed "
                        "threshold returns ZeRO-3's freed gather buffers to the system at once (56M parameters: peak RSS "
                        "1.4 instead of 2.4 GB a rank), which lets 300M fit in 23 GB")  # fmt: skip
    parser.add_argument("--workdir", default=str(ROOT / "runs"), help="the checkpoints go to a temporary directory here")
    parser.add_argument("--out", default="runs/bench_checkpoint", help="results.md, results.json, throughput.png, logs/")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (and print where)")
    parser.add_argument("--diagnose", action="store_true", help="also time torch.save to /dev/null and to a file, with and without CRC32")
    parser.add_argument("--no-crc32", action="store_true",
                        help="torch.save without its per-record CRC32 in the ranks (what megamm's save would do if it "
                        "turned it off; torch.load never checks it)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the job is stopped")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--param-count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value (not the model sizes --params sets)")
    args = parser.parse_args(argv)
    if args.save_every < 2:
        parser.error("--save-every must be >= 2: each repeat needs a normal step to compare the saving step with")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker_main(args)
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
