#!/usr/bin/env python
"""Data loader benchmark: megamm's training loader against bare WebDataset + Pillow, its scaling
over DataLoader workers, and what resuming from a saved data position costs.

The data is generated once and cached under ``--data`` (a directory per set of sizes): photo-like
JPEGs (smooth colour fields with gradients and grain, 640x480 at quality 90: about 70 KB each)
with a caption each, ``--per-shard`` samples a shard, a ``sizes.json`` index and a SentencePiece
tokenizer trained on the captions (``megamm.data.train_tokenizer``); for the resume part, 100
shards of 50 small samples (64x64 JPEGs). Parts (``--part``, all by default):

- ``throughput``: samples/s of one process (``num_workers=0``, in-process). **ours**:
  ``megamm.data.build_train_loader`` (``--image-size`` 224, ``--max-text-length`` 32,
  micro-batch ``--micro-batch`` 32, shuffle blocks of ``--shuffle-buffer``), tokenised and
  collated batches; **baseline**: bare ``webdataset`` (``wds.WebDataset(urls, shardshuffle=False)``),
  each jpg decoded by ``megamm.data.images.decode_image`` (the same JPEG draft mode, centre crop
  and bicubic resize), the caption tokenised with the same SentencePiece model, collated to the
  same tensors (``images_to_tensor``, padded ids and mask). The two alternate in the same
  process batch by batch (ours, baseline, baseline, ours, ..., after ``--warmup`` batches of
  each), so that both see the same load on a shared machine; each of ``--repeats`` repeats sums
  the time of ``--batches`` batches of each, in wall-clock and in the process's CPU time (one
  torch thread, ``--threads``, as in a DataLoader worker); reported as median [min, max], with
  the ratio ours/baseline of each repeat. Target: ours >= 0.9x the baseline. Then both are
  profiled with cProfile (``--profile``) and the report says where the time goes.
- ``scaling``: ours through the real DataLoader with ``--workers`` worker processes; samples/s
  in total and per worker (worker start-up excluded).
- ``resume``: on the 100-shard set, an uninterrupted stream (``_TrainStreams.batches``) keeps the
  stream state of the batches at several points (``--resume-points``, fractions of an epoch,
  one in the second epoch, and the fresh start); a fresh stream resumed from each state is
  timed to its first batch, with the bytes it read from the shards until then (and its first
  batch is checked against the uninterrupted run's next one). For contrast, the naive resume:
  re-reading every sample up to the point, shard after shard, without decoding
  (``iter_shard_samples``' loop over ``ShardReader``, which counts the bytes).

    flock /tmp/megamm-heavy.lock python tools/bench_data.py --out docs/benchmarks/data
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamm.config import DataConfig  # noqa: E402
from megamm.data import SIZES_FILE, ShardReader, Tokenizer, iter_captions, train_tokenizer  # noqa: E402
from megamm.data.images import decode_image, images_to_tensor  # noqa: E402
from megamm.data.pipeline import DataPosition, _TrainStreams, build_sources, build_train_loader, make_decoder  # noqa: E402
from megamm.data.streams import initial_state  # noqa: E402

PARTS = ("throughput", "scaling", "resume")
TARGET_RATIO = 0.9
"""ours / baseline samples/s that the in-process loader should reach."""
EXTRAS: tuple[str, ...] = ()
"""What the loaders read beside images and captions: nothing (an image-text model)."""


# ----------------------------------------------------------------------------------------------
# Data: photo-like JPEGs and captions, generated once and cached


_ADJECTIVES = (
    "red", "blue", "green", "yellow", "old", "small", "large", "bright", "dark", "wooden", "rusty", "shiny",
    "quiet", "busy", "misty", "sunny", "snowy", "colourful", "empty", "crowded",
)  # fmt: skip
_SUBJECTS = (
    "dog", "cat", "bicycle", "car", "boat", "house", "tree", "bird", "horse", "train", "bridge", "child",
    "woman", "man", "table", "lamp", "mountain", "river", "street", "market",
)  # fmt: skip
_VERBS = ("standing", "sitting", "resting", "waiting", "lying", "parked", "seen", "shown", "running", "glowing")
_PLACES = (
    "park", "beach", "kitchen", "station", "garden", "harbour", "forest", "field", "city square", "hillside",
    "lake", "road", "window", "village", "courtyard",
)  # fmt: skip
_TIMES = ("at sunset", "in the morning", "at night", "in the rain", "in winter", "on a summer day", "", "", "")


def caption(rng: np.random.Generator) -> str:
    """An English-like caption of 8-16 words."""
    pick = lambda words: words[int(rng.integers(len(words)))]  # noqa: E731
    text = f"a {pick(_ADJECTIVES)} {pick(_SUBJECTS)} {pick(_VERBS)} near the {pick(_ADJECTIVES)} {pick(_PLACES)}"
    if rng.random() < 0.5:
        text += f" with a {pick(_ADJECTIVES)} {pick(_SUBJECTS)}"
    return f"{text} {pick(_TIMES)}".strip()


def photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: a smooth colour field (octaves of upsampled noise), a gradient and
    grain, which JPEG compresses about as well as a photograph (~70 KB at 640x480, quality 90)."""
    from PIL import Image

    low_w, low_h = max(2, width // 4), max(2, height // 4)
    low = np.zeros((low_h, low_w, 3), np.float32)
    for cells, amplitude in ((4, 70.0), (16, 30.0), (48, 16.0)):
        noise = rng.standard_normal((max(2, cells * height // width), cells, 3)).astype(np.float32)
        for channel in range(3):
            plane = Image.fromarray(noise[..., channel], "F").resize((low_w, low_h), Image.Resampling.BICUBIC)
            low[..., channel] += amplitude * np.asarray(plane)
    y, x = np.mgrid[0:low_h, 0:low_w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    low += (np.cos(angle) * x / low_w + np.sin(angle) * y / low_h)[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)
    low += rng.uniform(60, 190, 3).astype(np.float32) + rng.standard_normal(low.shape).astype(np.float32) * 8.0
    smooth = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    return np.clip(np.asarray(smooth, np.int16) + grain, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class DataSet:
    """One generated set of shards."""

    directory: Path
    urls: list[str]
    sizes: list[int]
    tokenizer: Path

    @property
    def samples(self) -> int:
        return sum(self.sizes)

    @property
    def shard_bytes(self) -> float:
        """Mean shard file size."""
        return statistics.mean(os.path.getsize(url) for url in self.urls)

    @property
    def image_bytes(self) -> float:
        """Mean jpg size, from the first shard."""
        with tarfile.open(self.urls[0]) as tar:
            return statistics.mean(m.size for m in tar.getmembers() if m.name.endswith(".jpg"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def make_dataset(root: Path, name: str, shards: int, per_shard: int, width: int, height: int, quality: int,
                 seed: int, vocab_size: int) -> DataSet:  # fmt: skip
    """The shards of a set (generated into ``root`` unless already there), deterministic in the arguments."""
    directory = root / f"{name}-{shards}x{per_shard}-{width}x{height}-q{quality}-seed{seed}-v{vocab_size}"
    if not (directory / SIZES_FILE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=root))
        started = time.perf_counter()
        print(f"generating {shards} shards x {per_shard} samples ({width}x{height} JPEG q{quality}) in {directory} ...",
              flush=True)  # fmt: skip
        try:
            for shard in range(shards):
                rng = np.random.default_rng([seed, shard])
                with tarfile.open(work / f"shard-{shard:06d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
                    for index in range(per_shard):
                        key = f"s{shard:06d}-{index:06d}"
                        _add(tar, f"{key}.jpg", jpeg(photo(rng, width, height), quality))
                        _add(tar, f"{key}.txt", caption(rng).encode("utf-8"))
            urls = sorted(str(p) for p in work.glob("*.tar"))
            train_tokenizer(iter_captions(urls), work / "tokenizer.model", vocab_size)
            sizes = {f"shard-{shard:06d}.tar": per_shard for shard in range(shards)}
            (work / SIZES_FILE).write_text(json.dumps(sizes, indent=1))
            try:
                os.rename(work, directory)
            except OSError:  # made by another run meanwhile
                if not (directory / SIZES_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    urls = sorted(str(p) for p in directory.glob("*.tar"))
    table = json.loads((directory / SIZES_FILE).read_text())
    return DataSet(directory, urls, [table[os.path.basename(url)] for url in urls], directory / "tokenizer.model")


def data_config(data: DataSet, args: argparse.Namespace, image_size: int, shuffle_buffer: int, workers: int) -> DataConfig:
    return DataConfig(
        train_shards=str(data.directory), eval_shards=str(data.directory), tokenizer=str(data.tokenizer),
        image_size=image_size, max_text_length=args.max_text_length, num_workers=workers,
        shuffle_buffer=shuffle_buffer, open_shards=args.open_shards, seed=args.seed,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The two loaders


def ours_batches(data: DataSet, args: argparse.Namespace, workers: int = 0) -> Iterator[dict[str, Any]]:
    """megamm's training loader, endless: ``build_train_loader`` for data-parallel rank 0 of 1."""
    cfg = data_config(data, args, args.image_size, args.shuffle_buffer, workers)
    loader = build_train_loader(cfg, Tokenizer(data.tokenizer), 0, 1, args.micro_batch, extras=EXTRAS)
    yield from loader


def baseline_batches(data: DataSet, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Bare WebDataset + Pillow, the same decode, tokenisation and tensors, epoch after epoch."""
    import webdataset as wds

    tokenizer = Tokenizer(data.tokenizer)
    size, length, batch_size = args.image_size, args.max_text_length, args.micro_batch
    dataset = wds.WebDataset(data.urls, shardshuffle=False)
    images: list[np.ndarray] = []
    ids: list[list[int]] = []
    masks: list[list[bool]] = []
    keys: list[str] = []
    while True:
        for sample in dataset:
            images.append(decode_image(sample["jpg"], size))
            sample_ids, mask = tokenizer.encode(sample["txt"].decode("utf-8"), length)
            ids.append(sample_ids)
            masks.append(mask)
            keys.append(sample["__key__"])
            if len(keys) == batch_size:
                yield {
                    "image": images_to_tensor(np.stack(images)),  # (B, 3, S, S)
                    "text_ids": torch.tensor(ids, dtype=torch.int64),  # (B, T)
                    "text_mask": torch.tensor(masks, dtype=torch.bool),  # (B, T)
                    "keys": keys,
                }
                images, ids, masks, keys = [], [], [], []


def timed_rate(batches: Iterator[dict[str, Any]], count: int) -> float:
    """Samples/s of the next ``count`` batches."""
    samples = 0
    start = time.perf_counter()
    for _ in range(count):
        samples += len(next(batches)["keys"])
    return samples / (time.perf_counter() - start)


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


# ----------------------------------------------------------------------------------------------
# Parts


def run_throughput(data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    """Both loaders in this process, alternating batch by batch (which goes first alternates too),
    so that both see the same machine: each repeat sums each loader's time over ``--batches`` of
    its batches, in wall-clock and in this process's CPU time."""
    loaders = {"ours": ours_batches(data, args), "baseline": baseline_batches(data, args)}
    for _ in range(args.warmup):
        for batches in loaders.values():
            next(batches)
    wall: dict[str, list[float]] = {name: [] for name in loaders}
    cpu: dict[str, list[float]] = {name: [] for name in loaders}
    for repeat in range(args.repeats):
        seconds = {name: 0.0 for name in loaders}
        cpu_seconds = {name: 0.0 for name in loaders}
        samples = {name: 0 for name in loaders}
        for index in range(args.batches):
            for name in list(loaders) if index % 2 == 0 else list(reversed(loaders)):
                start, start_cpu = time.perf_counter(), time.process_time()
                batch = next(loaders[name])
                seconds[name] += time.perf_counter() - start
                cpu_seconds[name] += time.process_time() - start_cpu
                samples[name] += len(batch["keys"])
        for name in loaders:
            wall[name].append(samples[name] / seconds[name])
            cpu[name].append(samples[name] / cpu_seconds[name])
        print(f"  repeat {repeat + 1}/{args.repeats}: ours {wall['ours'][-1]:.1f} samples/s "
              f"({cpu['ours'][-1]:.1f} per CPU second), baseline {wall['baseline'][-1]:.1f} samples/s "
              f"({cpu['baseline'][-1]:.1f} per CPU second)", flush=True)  # fmt: skip
    for batches in loaders.values():
        batches.close()
    ratios = [o / b for o, b in zip(wall["ours"], wall["baseline"])]
    return {
        "ours": stats(wall["ours"]),
        "baseline": stats(wall["baseline"]),
        "ratio": stats(ratios),
        "ours_cpu": stats(cpu["ours"]),
        "baseline_cpu": stats(cpu["baseline"]),
        "ratio_cpu": stats([o / b for o, b in zip(cpu["ours"], cpu["baseline"])]),
        "target": TARGET_RATIO,
        "meets_target": statistics.median(ratios) >= TARGET_RATIO,
        "samples_per_repeat": args.batches * args.micro_batch,
        "shards": len(data.urls),
        "samples": data.samples,
        "image_bytes_mean": data.image_bytes,
        "width": args.width,
        "height": args.height,
        "torch_threads": torch.get_num_threads(),
    }


def run_scaling(data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for workers in args.workers:
        batches = ours_batches(data, args, workers)
        for _ in range(args.warmup * workers):  # worker start-up and each stream's first block
            next(batches)
        rates = []
        for repeat in range(args.repeats):
            rates.append(timed_rate(batches, args.batches * workers))
            print(f"  {workers} worker(s), repeat {repeat + 1}/{args.repeats}: {rates[-1]:.1f} samples/s", flush=True)
        batches.close()  # stops the workers
        rows.append({"workers": workers, "samples_per_s": stats(rates), "per_worker": stats([r / workers for r in rates])})
    return {"rows": rows, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}


def naive_replay(urls: list[str], samples: int) -> tuple[float, int]:
    """(seconds, bytes) to re-read the first ``samples`` samples, shard after shard (epoch after
    epoch), without decoding: ``iter_shard_samples``' loop, over ``ShardReader`` for its byte count."""
    read = total_bytes = 0
    start = time.perf_counter()
    while read < samples:
        for url in urls:
            reader = ShardReader(url)
            try:
                while read < samples and reader.next() is not None:
                    read += 1
            finally:
                reader.close()
                total_bytes += reader.bytes_read
            if read >= samples:
                break
    return time.perf_counter() - start, total_bytes


def run_resume(data: DataSet, args: argparse.Namespace) -> dict[str, Any]:
    epoch = data.samples
    targets = sorted({max(1, round(fraction * epoch)) for fraction in args.resume_points})
    runs = []
    for buffer in args.resume_shuffle_buffers:
        cfg = data_config(data, args, args.resume_image_size, buffer, 0)
        sources, decoder, tokenizer = build_sources(cfg), make_decoder(cfg, EXTRAS, None), Tokenizer(data.tokenizer)

        def streams() -> _TrainStreams:
            return _TrainStreams(cfg, sources, tokenizer, 0, 1, args.micro_batch, DataPosition(), decoder)

        # The uninterrupted run: the state after the first batch at or past each point, and the keys
        # of the batch after it (what the resumed stream must yield first).
        points: list[dict[str, Any]] = [{"samples": 0, "state": initial_state(len(sources)), "next_keys": None}]
        started = time.perf_counter()
        consumed, remaining = 0, list(targets)
        for batch in streams().batches(0, initial_state(len(sources))):
            if points[-1]["next_keys"] is None:
                points[-1]["next_keys"] = batch["keys"]
            consumed += batch["seen"]
            if not remaining:
                break
            if consumed >= remaining[0]:
                points.append({"samples": consumed, "state": batch["position"], "next_keys": None})
                while remaining and consumed >= remaining[0]:
                    remaining.pop(0)
        print(f"  shuffle buffer {buffer}: uninterrupted run to {consumed} samples in "
              f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        rows = []
        for point in points:
            seconds, read, matches = [], [], True
            for _ in range(args.repeats):
                counter = [0]
                start = time.perf_counter()
                resumed = streams().batches(0, copy.deepcopy(point["state"]), counter)
                first = next(resumed)
                seconds.append(time.perf_counter() - start)
                read.append(counter[0])
                resumed.close()
                matches = matches and first["keys"] == point["next_keys"]
            rows.append({
                "samples": point["samples"], "epoch_fraction": point["samples"] / epoch, "state": point["state"],
                "seconds": stats(seconds), "bytes": stats(read), "first_batch_matches": matches,
            })  # fmt: skip
            print(f"    resume at {point['samples']} samples: {statistics.median(seconds) * 1000:.1f} ms, "
                  f"{statistics.median(read) / 1e6:.3f} MB, first batch {'matches' if matches else 'DIFFERS'}", flush=True)  # fmt: skip
        runs.append({"shuffle_buffer": buffer, "points": rows})
    naive = []
    for samples in sorted({row["samples"] for run in runs for row in run["points"]}):
        seconds, read = [], 0
        for _ in range(args.repeats):
            elapsed, read = naive_replay(data.urls, samples)
            seconds.append(elapsed)
        naive.append({"samples": samples, "seconds": stats(seconds), "bytes": read})
        print(f"    naive re-read of {samples} samples: {statistics.median(seconds) * 1000:.1f} ms, "
              f"{read / 1e6:.3f} MB", flush=True)  # fmt: skip
    return {
        "runs": runs, "naive": naive, "epoch_samples": epoch, "shards": len(data.urls), "samples_per_shard": data.sizes[0],
        "shard_bytes": data.shard_bytes, "image_bytes_mean": data.image_bytes, "open_shards": args.open_shards,
        "image_size": args.resume_image_size,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Profile (why ours is slower, when it is)

_KEY_FUNCTIONS = (  # (label, file, function, cumulative: else the function's own lines only)
    ("decode_image (open, draft, JPEG decode, crop, resize)", "images.py", "decode_image"),
    ("JPEG decode (ImageFile.load)", "ImageFile.py", "load"),
    ("resize (Image.resize)", "Image.py", "resize"),
    ("SampleDecoder.__call__ (caption, decode_image)", "samples.py", "__call__"),
    ("ShardReader.next (tar reading)", "shards.py", "next"),
    ("Tokenizer.encode", "tokenizer.py", "encode"),
    ("_Collator.__call__ (ours' collation)", "pipeline.py", "__call__"),
    ("_Collator.__call__, its own lines (tensor indexing and operators, not calls)", "pipeline.py", "__call__", False),
    ("images_to_tensor", "images.py", "images_to_tensor"),
    ("webdataset tar iteration (tar_file_iterator)", "tariterators.py", "tar_file_iterator"),
    ("DataLoader fetch (default_convert)", "collate.py", "default_convert"),
)


def profile_loader(make: Callable[[], Iterator[dict[str, Any]]], args: argparse.Namespace, top: int = 15) -> dict[str, Any]:
    """cProfile of ``--batches`` batches after the warm-up: the functions with the most self time,
    and the cumulative time of the key steps, as shares of the profiled time."""
    batches = make()
    for _ in range(args.warmup):
        next(batches)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    samples = sum(len(next(batches)["keys"]) for _ in range(args.batches))
    profiler.disable()
    wall = time.perf_counter() - start
    batches.close()
    table = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values())

    def where(key: tuple[str, int, str]) -> str:
        path, line, name = key
        return f"{name} ({Path(path).name}:{line})" if line else name

    ranked = sorted(table.items(), key=lambda item: -item[1][2])[:top]
    key_steps = {}
    for label, file_name, function, *own in _KEY_FUNCTIONS:
        matches = [entry for (path, _, name), entry in table.items() if name == function and path.endswith(file_name)]
        if matches:
            cumulative = max(entry[2 if own else 3] for entry in matches)
            key_steps[label] = {"cum_s": cumulative, "cum_share": cumulative / total, "calls": sum(e[1] for e in matches)}
    return {
        "samples": samples, "wall_s": wall, "profiled_s": total, "samples_per_s_under_profile": samples / wall,
        "top_self": [
            {"function": where(key), "calls": entry[1], "self_s": entry[2], "self_share": entry[2] / total,
             "cum_s": entry[3], "cum_share": entry[3] / total}
            for key, entry in ranked
        ],
        "key_steps": key_steps,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import PIL
    import sentencepiece
    import webdataset
    from PIL import features

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    turbo = features.check_feature("libjpeg_turbo")
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory, 1), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "pillow": PIL.__version__,
        "libjpeg": f"{'libjpeg-turbo' if turbo else 'libjpeg'} {features.version_codec('jpg')}",
        "webdataset": webdataset.__version__, "numpy": np.__version__, "sentencepiece": sentencepiece.__version__,
    }  # fmt: skip


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['memory_gib']:.0f} GiB RAM; "
        f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} intra-op thread(s)), "
        f"Pillow {info['pillow']} ({info['libjpeg']}), webdataset {info['webdataset']}, numpy {info['numpy']}, "
        f"sentencepiece {info['sentencepiece']}"
    )


def _spread(entry: dict[str, Any], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return f"{fmt.format(entry['median'] * scale)} [{fmt.format(entry['min'] * scale)}, {fmt.format(entry['max'] * scale)}]"


def _mb(value: float) -> str:
    return f"{value / 1e6:.3f}"


def render_throughput(result: dict[str, Any], args: argparse.Namespace) -> str:
    ratio, ratio_cpu = result["ratio"], result["ratio_cpu"]
    verdict = "meets" if result["meets_target"] else "misses"
    return (
        f"{result['shards']} shards x {result['samples'] // result['shards']} samples: {result['width']}x{result['height']} "
        f"JPEGs (quality {args.quality}) of {result['image_bytes_mean'] / 1e3:.0f} KB on average and a caption each, "
        f"decoded to {args.image_size}x{args.image_size}, captions to {args.max_text_length} ids, micro-batch "
        f"{args.micro_batch}; ours with shuffle blocks of {args.shuffle_buffer} samples and {args.open_shards} open "
        f"shards. One process (`num_workers=0`, {result['torch_threads']} torch thread(s)), the two loaders "
        f"alternating batch by batch after {args.warmup} warm-up batches of each; {args.repeats} repeats of "
        f"{result['samples_per_repeat']} samples of each; median [min, max] over the repeats, the ratio taken "
        "repeat by repeat. Wall-clock samples/s, and samples per CPU second of the process (which leaves out "
        "the time other jobs held the cores). The shards are in the page cache, so this measures CPU, not the disk.\n\n"
        "| loader | samples/s | ratio ours / baseline | samples per CPU second | ratio |\n| --- | --- | --- | --- | --- |\n"
        f"| baseline: `wds.WebDataset` + `decode_image` + SentencePiece + `images_to_tensor` | "
        f"{_spread(result['baseline'])} | | {_spread(result['baseline_cpu'])} | |\n"
        f"| **ours**: `build_train_loader` (`num_workers=0`) | {_spread(result['ours'])} | "
        f"**{_spread(ratio, '{:.2f}')}** | {_spread(result['ours_cpu'])} | {_spread(ratio_cpu, '{:.2f}')} |\n\n"
        f"**Ours is {ratio['median']:.2f}x the baseline (median of the per-repeat ratios, range "
        f"{ratio['min']:.2f}-{ratio['max']:.2f}x; {ratio_cpu['median']:.2f}x in CPU time): it {verdict} the "
        f"{TARGET_RATIO}x target.**"
    )


def render_scaling(result: dict[str, Any]) -> str:
    lines = ["| DataLoader workers | samples/s, total | samples/s per worker | total vs 1 worker |", "| --- | --- | --- | --- |"]
    one = next((row["samples_per_s"]["median"] for row in result["rows"] if row["workers"] == 1), None)
    for row in result["rows"]:
        speedup = f"{row['samples_per_s']['median'] / one:.2f}x" if one else "-"
        lines.append(f"| {row['workers']} | {_spread(row['samples_per_s'])} | {_spread(row['per_worker'])} | {speedup} |")
    return (
        f"This machine has {result['usable_cores']} usable cores, shared by the workers, the main process that "
        "receives the batches (each worker's batch crosses processes through shared memory) and whatever else "
        "runs; more workers than cores cannot scale, and 2 workers here compete with the main process.\n\n"
        + "\n".join(lines)
    )


def render_resume(result: dict[str, Any], args: argparse.Namespace) -> str:
    shard = result["shard_bytes"]
    naive = {row["samples"]: row for row in result["naive"]}
    parts = [
        f"{result['shards']} shards x {result['samples_per_shard']} samples ({result['epoch_samples']} an epoch): "
        f"{result['image_bytes_mean'] / 1e3:.1f} KB JPEGs and captions, {shard / 1e3:.0f} KB a shard, decoded to "
        f"{result['image_size']}x{result['image_size']}; micro-batch {args.micro_batch}, {result['open_shards']} open "
        f"shards. Ours: a fresh `_TrainStreams.batches(stream, state)` from the saved state until its first batch "
        "(decoded and collated), bytes read from the shards until then. Naive: re-reading every sample up to the "
        f"point without decoding. {args.repeats} repeats; seconds median [min, max]. Row 0 is a fresh start.\n"
    ]
    for run in result["runs"]:
        block = run["shuffle_buffer"]
        lines = [
            f"\nShuffle blocks of {block} samples ({block / result['samples_per_shard']:.2g} shards):\n",
            "| resume after (samples, epoch) | ours: ms to first batch | ours: MB read (shards) | ours: MB beyond a fresh "
            "start | naive: ms | naive: MB read (shards) | first batch as uninterrupted |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        fresh = next(row["bytes"]["median"] for row in run["points"] if row["samples"] == 0)
        for row in run["points"]:
            base = naive[row["samples"]]
            ours_bytes = row["bytes"]["median"]
            lines.append(
                f"| {row['samples']} ({row['epoch_fraction']:.2f}) | {_spread(row['seconds'], '{:.1f}', 1000)} "
                f"| {_mb(ours_bytes)} ({ours_bytes / shard:.2f}) | {_mb(ours_bytes - fresh)} "
                f"| {_spread(base['seconds'], '{:.1f}', 1000)} "
                f"| {_mb(base['bytes'])} ({base['bytes'] / shard:.2f}) | {'yes' if row['first_batch_matches'] else '**no**'} |"
            )
        parts.append("\n".join(lines))
    return "\n".join(parts)


def render_profile(profile: dict[str, Any]) -> str:
    parts = []
    for name, entry in profile.items():
        lines = [
            f"\n**{name}**: {entry['samples']} samples in {entry['wall_s']:.2f} s under the profiler "
            f"({entry['samples_per_s_under_profile']:.1f} samples/s); shares of the {entry['profiled_s']:.2f} s profiled.\n",
            "| key step | calls | cumulative s | share |", "| --- | --- | --- | --- |",
        ]
        for label, step in entry["key_steps"].items():
            lines.append(f"| {label} | {step['calls']} | {step['cum_s']:.3f} | {100 * step['cum_share']:.1f}% |")
        lines += ["", "| function (most self time) | calls | self s | self share | cumulative share |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for row in entry["top_self"]:
            lines.append(
                f"| `{row['function']}` | {row['calls']} | {row['self_s']:.3f} | {100 * row['self_share']:.1f}% "
                f"| {100 * row['cum_share']:.1f}% |"
            )
        parts.append("\n".join(lines))
    return "\n".join(parts)


def render_report(results: dict[str, Any], args: argparse.Namespace) -> str:
    sections = [
        f"# Data loader benchmark\n\n`{results['command']}`\n\n{results['date']}, {machine_line(results['machine'])}. "
        "A shared machine: other jobs may run beside the benchmark (heavy ones are serialised with flock), so "
        "expect some noise; the two loaders alternate in one process so that both see the same conditions."
    ]
    if "throughput" in results:
        sections.append("## Throughput, one process\n\n" + render_throughput(results["throughput"], args))
    if "profile" in results:
        sections.append("## Where the time goes (cProfile)\n" + render_profile(results["profile"]))
    if "scaling" in results:
        sections.append("## Scaling over DataLoader workers (ours)\n\n" + render_scaling(results["scaling"]))
    if "resume" in results:
        sections.append("## Resuming from a saved data position\n\n" + render_resume(results["resume"], args))
    if results.get("figure"):
        sections.append(f"![throughput and resume]({results['figure']})")
    return "\n\n".join(sections) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput bars (min-max error bars) and resume seconds / bytes against samples consumed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, resume) = plt.subplots(1, 2, figsize=(13, 4.8))
    entries: list[tuple[str, dict[str, Any], str]] = []
    if "throughput" in results:
        entries += [("baseline\nwds + Pillow\n(in-process)", results["throughput"]["baseline"], "#999999"),
                    ("ours\n(in-process)", results["throughput"]["ours"], "#1f77b4")]  # fmt: skip
    for row in results.get("scaling", {}).get("rows", []):
        entries.append((f"ours\n{row['workers']} worker{'s' if row['workers'] > 1 else ''}", row["samples_per_s"], "#aec7e8"))
    if entries:
        x = list(range(len(entries)))
        medians = [entry["median"] for _, entry, _ in entries]
        errors = [[m - e["min"] for m, (_, e, _) in zip(medians, entries)],
                  [e["max"] - m for m, (_, e, _) in zip(medians, entries)]]  # fmt: skip
        bars.bar(x, medians, yerr=errors, capsize=4, color=[colour for _, _, colour in entries])
        bars.set_xticks(x, [label for label, _, _ in entries], fontsize=8)
        if "throughput" in results:
            ratio = results["throughput"]["ratio"]
            target = TARGET_RATIO * results["throughput"]["baseline"]["median"]
            bars.plot([0.55, 1.45], [target, target], color="red", linestyle="--", linewidth=1, label=f"{TARGET_RATIO}x baseline")
            bars.text(1, entries[1][1]["max"], f"{ratio['median']:.2f}x [{ratio['min']:.2f}, {ratio['max']:.2f}]",
                      ha="center", va="bottom", fontsize=8)  # fmt: skip
            bars.legend(fontsize=8, loc="lower right")
        bars.set_ylabel("samples/s (median; bars: min-max)")
        bars.set_title(f"Loader throughput ({results['machine']['usable_cores']} cores)", fontsize=10)
        bars.grid(axis="y", alpha=0.3)
    else:
        bars.set_axis_off()
    if "resume" in results:
        data = results["resume"]
        size = resume.twinx()
        naive = [row for row in data["naive"] if row["samples"] > 0]
        xs = [row["samples"] for row in naive]
        resume.plot(xs, [row["seconds"]["median"] for row in naive], "k-o", label="naive re-read: seconds")
        size.plot(xs, [row["bytes"] for row in naive], "k--s", alpha=0.6, label="naive re-read: bytes")
        for colour, run in zip(("#1f77b4", "#2ca02c", "#9467bd"), data["runs"]):
            rows = run["points"]
            xs = [row["samples"] for row in rows]
            medians = [row["seconds"]["median"] for row in rows]
            errors = [[m - r["seconds"]["min"] for m, r in zip(medians, rows)],
                      [r["seconds"]["max"] - m for m, r in zip(medians, rows)]]  # fmt: skip
            resume.errorbar(xs, medians, yerr=errors, fmt="-o", color=colour, capsize=3,
                            label=f"ours, blocks of {run['shuffle_buffer']}: seconds")  # fmt: skip
            size.plot(xs, [row["bytes"]["median"] for row in rows], "--s", color=colour, alpha=0.6,
                      label=f"ours, blocks of {run['shuffle_buffer']}: bytes")  # fmt: skip
        size.axhline(data["shard_bytes"], color="red", linestyle=":", linewidth=1, label="one shard (bytes)")
        resume.set_yscale("log")
        size.set_yscale("log")
        resume.set_xlabel(f"samples consumed before the stop (epoch = {data['epoch_samples']})")
        resume.set_ylabel("seconds to the first batch (solid)")
        size.set_ylabel("bytes read from the shards (dashed)")
        resume.set_title(f"Resume cost: {data['shards']} shards x {data['samples_per_shard']} samples", fontsize=10)
        resume.grid(alpha=0.3)
        handles = [h for ax in (resume, size) for h in ax.get_legend_handles_labels()[0]]
        labels = [lab for ax in (resume, size) for lab in ax.get_legend_handles_labels()[1]]
        resume.legend(handles, labels, fontsize=7, loc="upper left", framealpha=0.9)
    else:
        resume.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "megamm-bench-data"),
                        help="where the generated shards are cached (one directory per set of sizes)")  # fmt: skip
    parser.add_argument("--out", help="write results.json, results.md and data.png here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=16,
                        help="timed batches per repeat (per worker in scaling); best a multiple of "
                        "shuffle-buffer / micro-batch")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches of each loader first (per worker)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers for the scaling part")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="always",
                        help="cProfile both loaders after the throughput part (auto: when ours misses the target)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of this process (a DataLoader worker runs with 1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    # the throughput set and the loaders
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-text-length", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--open-shards", type=int, default=DataConfig.open_shards)
    parser.add_argument("--vocab-size", type=int, default=512)
    # the resume set
    parser.add_argument("--resume-shards", type=int, default=100)
    parser.add_argument("--resume-per-shard", type=int, default=50)
    parser.add_argument("--resume-size", type=int, default=64, help="side of the resume set's square JPEGs")
    parser.add_argument("--resume-image-size", type=int, default=64)
    parser.add_argument("--resume-shuffle-buffers", type=int, nargs="+", default=[256, 32])
    parser.add_argument("--resume-points", type=float, nargs="+", default=[0.01, 0.25, 0.5, 0.9, 0.99, 1.5],
                        help="where to stop and resume, in epochs (1.5: half way through the second epoch)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batches < 1 or args.warmup < 1:
        parser.error("--repeats, --batches and --warmup must be >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "command": "python tools/bench_data.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "settings": {key: value for key, value in vars(args).items() if key not in ("out",)},
    }
    root = Path(args.data)
    started = time.perf_counter()
    if "throughput" in args.part or "scaling" in args.part:
        photos = make_dataset(root, "photos", args.shards, args.per_shard, args.width, args.height, args.quality,
                              args.seed, args.vocab_size)  # fmt: skip
        if "throughput" in args.part:
            print("throughput: ours vs baseline, in-process ...", flush=True)
            results["throughput"] = run_throughput(photos, args)
        missed = "throughput" in results and not results["throughput"]["meets_target"]
        if args.profile == "always" or (args.profile == "auto" and missed):
            print("profiling both loaders ...", flush=True)
            results["profile"] = {
                "ours": profile_loader(lambda: ours_batches(photos, args), args),
                "baseline": profile_loader(lambda: baseline_batches(photos, args), args),
            }
        if "scaling" in args.part:
            print(f"scaling over {args.workers} DataLoader workers ...", flush=True)
            results["scaling"] = run_scaling(photos, args)
    if "resume" in args.part:
        small = make_dataset(root, "small", args.resume_shards, args.resume_per_shard, args.resume_size, args.resume_size,
                             args.quality, args.seed, args.vocab_size)  # fmt: skip
        print("resume: ours vs naive re-read ...", flush=True)
        results["resume"] = run_resume(small, args)
    results["seconds"] = time.perf_counter() - started
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results["figure"] = "data.png"
        plot(results, out / "data.png")
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = render_report(results, args)
    print("\n" + report)
    if args.out:
        (Path(args.out) / "results.md").write_text(report)
    runs = results.get("resume", {}).get("runs", [])
    mismatched = [row for run in runs for row in run["points"] if not row["first_batch_matches"]]
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
