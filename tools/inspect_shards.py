"""Check WebDataset shards the way training reads them: every sample decoded, bad data counted by reason.

Every sample of every shard named by the specifications is read with the loader's own reader
(:class:`megamm.data.shards.ShardReader`) and decoded with the loader's own decoder
(:class:`megamm.data.samples.SampleDecoder`, built as :func:`megamm.data.pipeline.make_decoder`
builds it), so a sample this tool calls good is one training uses, and a bad one is skipped by
training for the same reason (:data:`megamm.data.samples.BAD_REASONS`).

Examples::

    # the demo shards, decoded as the tiny recipe decodes them (the default settings)
    python tools/inspect_shards.py 'demo_data/train/shard-{000000..000007}.tar'

    # a directory, a glob and a streamed shard at once; 4 processes; JSON on the last line
    python tools/inspect_shards.py shards/coco 'extra/*.tar' 'pipe:curl -s -L https://host/a-0000.tar' \\
        --workers 4 --json

    # as a given recipe (with overrides) would train on them; larger images, no audio
    python tools/inspect_shards.py shards/train --config base model.objectives.vqa=0 --image-size 224 --no-audio

    # only image-text pairs count as usable; show 5 decoded samples
    python tools/inspect_shards.py shards/train --pairs image_text --samples 5

Specifications (``SPEC``) are those of ``data.train_shards``: a brace pattern, a glob, a
directory (its ``*.tar``), a file, a ``pipe:`` command (whose standard output is the tar), or a
comma-separated list of these. Shards written by plain GNU ``tar -cf x.tar -C dir .`` (members
``./key.jpg``, a ``./`` directory entry) read the same as WebDataset's.

Decoder settings: the ``tiny`` recipe's (``--config`` names another recipe or a YAML file,
followed by ``key=value`` overrides), that is ``data.image_size``, ``data.max_audio_seconds`` and
``data.seed``, and the extras and pairs of its model (``ModelConfig.data_extras`` /
``data_pairs``: audio is read when ``model.audio.enabled``, questions when a VQA objective is
on). Flags override them: ``--image-size``, ``--max-audio-seconds``, ``--audio/--no-audio``,
``--questions/--no-questions``, ``--pairs``. Without ``--pairs``, turning audio off drops the
audio pairs, and turning it on for a model without audio makes every pair usable (as
:class:`SampleDecoder` does by default).

A shard problem (``tar_truncated``, ``tar_corrupt``, ``shard_unreadable``, ``pipe_failed``) ends
the shard, as in training: the samples read before it stand, and the rest are counted bad under
that reason, as many as the index says were left (else 1, as training counts them).

The index: when a ``sizes.json`` beside a local shard (or the file given with ``--index``, which
also covers ``pipe:`` shards) lists the shard, its count is compared with the samples the shard
really holds; a mismatch would break exact epochs and counts as a problem. Shards that ended
early are not compared (their true count is unknown; their loss is counted already).

Output (stdout): the shards with problems and a total (samples read, good, bad, bytes read), bad
samples by reason with one example each, index mismatches, and statistics of the data itself,
whatever the decoder reads: tar member extensions and how often, keys that occur more than
once (across shards or within one), original image sizes (width x height from the header only,
ordered by pixel count), caption lengths in words (every caption), audio durations (from the
header), samples with questions, and ``--samples K`` decoded samples. With ``--json`` the last
line of stdout is one JSON object::

    {"good": 35, "bad": {"image_corrupt": 2, "tar_truncated": 1}, "samples": 37, "lost": 1,
     "shards": 4, "shard_problems": [{"shard": ..., "samples": ..., "good": ..., "bad": {...}, ...}],
     "index_mismatches": [{"shard": ..., "index": 12, "actual": 10}], "index_missing": [...],
     "extensions": {"jpg": 30, "txt": 30}, "bytes": 123456, "bad_examples": {...},
     "duplicate_keys": {"count": 0, "examples": []}, "image_sizes": {...}, "caption_words": {...},
     "audio_seconds": {...}, "questions": 0, "decoder": {...}, "examples": [...], "exit": 1}

``good`` counts the samples training would use; ``bad`` the samples it would skip, by reason
(shard problems included); ``samples`` the samples read from the tars (good ones and bad ones),
``lost`` the samples counted bad for shard problems that were never read, so ``good + sum(bad)
== samples + lost``. Progress and log messages go to stderr.

Exit status: 0 when every sample is good and every index count matches; 1 when some sample or
shard is bad, an index count is wrong, or no sample at all is usable; 2 on a usage error (bad
flags, a specification that matches nothing, a bad recipe or override).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from PIL import Image
from tqdm import tqdm

from megamm.config import ConfigError, DataConfig, load_config
from megamm.data.audio import AUDIO_EXTENSIONS, audio_info
from megamm.data.images import IMAGE_EXTENSIONS
from megamm.data.pipeline import make_decoder
from megamm.data.samples import EXTRAS, PAIRS, Bad, SampleDecoder, default_pairs, read_text
from megamm.data.shards import SIZES_FILE, ShardReader, expand_shards, is_pipe, read_index, shard_name

logger = logging.getLogger("inspect_shards")

DEFAULT_RECIPE = "tiny"
"""The recipe whose data and model settings decide how samples decode unless ``--config`` is given."""
FIELD_NAME = "inspect_shards SPEC"
"""How a specification is named in error messages."""
MAX_SHARD_LINES = 50
"""Shards with problems listed one a line in the human report (the JSON lists every one)."""
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
"""An object's address in an error message (libsndfile's ``<bytes at 0x7f...>``): dropped, so
that the report does not depend on the process that decoded the sample."""


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """How samples are decoded (the arguments of :class:`SampleDecoder`) and what is collected."""

    image_size: int
    sample_rate: int
    max_audio_samples: int
    seed: int
    extras: tuple[str, ...]
    pairs: tuple[str, ...]
    previews: int
    """Decoded samples to keep (per shard; the first ``previews`` overall are shown)."""

    def decoder(self) -> SampleDecoder:
        """The decoder training would build with these settings."""
        return SampleDecoder(self.image_size, self.sample_rate, self.max_audio_samples, self.seed, self.extras, self.pairs)

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-friendly dict."""
        return {
            "image_size": self.image_size,
            "max_audio_seconds": self.max_audio_samples / self.sample_rate,
            "seed": self.seed,
            "extras": list(self.extras),
            "pairs": list(self.pairs),
        }


class UsageError(ValueError):
    """The command cannot run as given; the message says why and what to do."""


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The decoder settings: the recipe's, then the flags.

    Raises:
        UsageError: a bad recipe, override or flag value, or a combination the decoder refuses.
    """
    recipe, *overrides = args.config or [DEFAULT_RECIPE]
    try:
        config = load_config(recipe, overrides)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    data: DataConfig = config.data
    changes: dict[str, Any] = {}
    if args.image_size is not None:
        changes["image_size"] = args.image_size
    if args.max_audio_seconds is not None:
        changes["max_audio_seconds"] = args.max_audio_seconds
    data = dataclasses.replace(data, **changes)
    try:
        data.validate("data")
    except ConfigError as err:
        flag = {"image_size": "--image-size", "max_audio_seconds": "--max-audio-seconds"}
        raise UsageError(f"{err} (set with {', '.join(flag[name] for name in changes) or '--config'})") from None

    extras = list(config.model.data_extras)
    pairs = list(config.model.data_pairs)
    for extra, wanted in (("audio", args.audio), ("qa", args.questions)):
        if wanted is True and extra not in extras:
            extras.append(extra)
            if extra == "audio" and not config.model.audio.enabled:
                pairs = list(default_pairs(extras))
        elif wanted is False and extra in extras:
            extras.remove(extra)
    if "audio" not in extras:
        pairs = [pair for pair in pairs if pair == "image_text"]
    if args.pairs is not None:
        pairs = [pair.strip() for pair in args.pairs.split(",") if pair.strip()]
        unknown = sorted(set(pairs) - set(PAIRS))
        if unknown or not pairs:
            raise UsageError(f"--pairs {args.pairs!r}: give a comma-separated subset of {', '.join(PAIRS)}")
        if "audio" not in extras and {"audio_text", "image_audio"} & set(pairs):
            raise UsageError(f"--pairs {args.pairs!r} needs audio, which is off (drop --no-audio or pass --audio)")
    extras_sorted = tuple(extra for extra in EXTRAS if extra in extras)
    pairs_sorted = tuple(pair for pair in PAIRS if pair in pairs)
    try:
        decoder = make_decoder(data, extras_sorted, pairs_sorted)  # the loaders' decoder, refusing what they refuse
    except ValueError as err:
        raise UsageError(f"the decoder refuses these settings: {err}") from None
    return Settings(
        image_size=decoder.image_size,
        sample_rate=decoder.sample_rate,
        max_audio_samples=decoder.max_audio_samples,
        seed=decoder.seed,
        extras=extras_sorted,
        pairs=pairs_sorted,
        previews=args.samples,
    )


# ----------------------------------------------------------------------------------------------
# One shard


@dataclass
class ShardReport:
    """What one shard holds (picklable: it comes back from worker processes)."""

    url: str
    expected: int | None
    """The shard's count in its index, None if no index lists it."""
    samples: int = 0
    """Samples read (good and bad; not those lost to a shard problem)."""
    good: int = 0
    bad: Counter[str] = field(default_factory=Counter)
    """Bad samples by reason, including those lost to a shard problem."""
    examples: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    """reason -> (key or None for a shard problem, detail) of the first such sample."""
    error: tuple[str, str] | None = None
    """(reason, detail) of the shard problem that ended it."""
    lost: int = 0
    """Samples counted bad for the shard problem (the index's unread count, else 1)."""
    bytes_read: int = 0
    extensions: Counter[str] = field(default_factory=Counter)
    keys: list[str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    audio_seconds: list[float] = field(default_factory=list)
    questions: int = 0
    """Samples holding at least one question."""
    previews: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The shard's index name (file name, or the object a ``pipe:`` command fetches)."""
        return shard_name(self.url)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    @property
    def index_mismatch(self) -> bool:
        """The index lists the shard with a count other than the samples of a shard read whole."""
        return self.expected is not None and self.error is None and self.expected != self.samples

    @property
    def has_problem(self) -> bool:
        return self.bad_total > 0 or self.index_mismatch


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header, None if it does not open."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Exception:  # Pillow raises many kinds for bad data
        return None


def _audio_seconds(data: bytes, extension: str) -> float | None:
    """A clip's duration from its header, None if unknown or unreadable."""
    try:
        info = audio_info(data, extension)
    except Exception:  # AudioError, and whatever libsndfile raises for junk
        return None
    if info.frames is None or info.sample_rate <= 0:
        return None
    return info.frames / info.sample_rate


def _collect_statistics(report: ShardReport, sample: dict[str, Any]) -> None:
    """Add a raw sample's members, image size, captions, audio duration and questions."""
    members = [name for name in sample if not name.startswith("__")]
    report.extensions.update(members)
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is not None:
        size = _image_size(bytes(sample[image_ext]))
        if size is not None:
            report.image_sizes.append(size)
    audio_ext = next((ext for ext in AUDIO_EXTENSIONS if ext in sample), None)
    if audio_ext is not None:
        seconds = _audio_seconds(bytes(sample[audio_ext]), audio_ext)
        if seconds is not None:
            report.audio_seconds.append(seconds)
    text = read_text(sample, questions=True)
    report.caption_words.extend(len(caption.split()) for caption in text.captions)
    if text.questions:
        report.questions += 1


def inspect_shard(url: str, expected: int | None, settings: Settings, decoder: SampleDecoder | None = None) -> ShardReport:
    """Read and decode every sample of one shard.

    Args:
        url: a local path or a ``pipe:`` command.
        expected: the shard's count in its index (None: not listed).
        settings: the decoder settings and the number of decoded samples to keep.
        decoder: a decoder built from ``settings`` (built here if None).
    """
    decoder = decoder or settings.decoder()
    report = ShardReport(url, expected)
    reader = ShardReader(url)
    try:
        while (sample := reader.next()) is not None:
            report.samples += 1
            key = str(sample["__key__"])
            report.keys.append(key)
            _collect_statistics(report, sample)
            decoded = decoder(sample)
            if isinstance(decoded, Bad):
                report.bad[decoded.reason] += 1
                report.examples.setdefault(decoded.reason, (key, _ADDRESS.sub("", decoded.detail)))
                continue
            report.good += 1
            if len(report.previews) < settings.previews:
                report.previews.append({
                    "shard": report.name,
                    "key": decoded.key,
                    "caption": decoded.caption,
                    "question": None if decoded.question is None else decoded.question[0],
                    "answer": None if decoded.question is None else decoded.question[1],
                    "image": None if decoded.image is None else list(decoded.image.shape),
                    "audio_seconds": None if decoded.audio is None else len(decoded.audio) / settings.sample_rate,
                })
    finally:
        reader.close()
        report.bytes_read = reader.bytes_read
    if reader.error is not None:
        reason = reader.error.reason
        detail = str(reader.error)
        detail = detail[len(url) + 2:] if detail.startswith(f"{url}: ") else detail
        report.error = (reason, detail)
        report.lost = max((expected or 0) - report.samples, 1)
        report.bad[reason] += report.lost
        report.examples.setdefault(reason, (None, detail))
    return report


_WORKER: dict[str, Any] = {}


def _init_worker(settings: Settings) -> None:
    """Pool initializer: one decoder per worker process."""
    _WORKER["settings"] = settings
    _WORKER["decoder"] = settings.decoder()


def _inspect_job(job: tuple[str, int | None]) -> ShardReport:
    url, expected = job
    return inspect_shard(url, expected, _WORKER["settings"], _WORKER["decoder"])


def iter_reports(jobs: Sequence[tuple[str, int | None]], settings: Settings, workers: int) -> Iterator[ShardReport]:
    """One report per ``(url, expected)`` job, in job order, from ``workers`` processes."""
    if workers <= 1 or len(jobs) <= 1:
        decoder = settings.decoder()
        for url, expected in jobs:
            yield inspect_shard(url, expected, settings, decoder)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with context.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.imap(_inspect_job, jobs, chunksize=1)


# ----------------------------------------------------------------------------------------------
# The index


def index_counts(urls: Sequence[str], index: str | None) -> tuple[list[int | None], list[str]]:
    """Each shard's count in its index (None where none lists it), and the shards missing from
    an index that exists (``--index``, or a ``sizes.json`` beside the shard)."""
    tables: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    missing: list[str] = []
    for url in urls:
        if index:
            table_path = index
        elif is_pipe(url):
            counts.append(None)
            continue
        else:
            table_path = os.path.join(os.path.dirname(url), SIZES_FILE)
        if table_path not in tables:
            tables[table_path] = read_index(table_path) if os.path.isfile(table_path) else {}
        count = tables[table_path].get(shard_name(url))
        counts.append(count)
        if count is None and os.path.isfile(table_path):
            missing.append(url)
    return counts, missing


# ----------------------------------------------------------------------------------------------
# The summary


def _percentile_stats(values: Sequence[float]) -> dict[str, Any] | None:
    """{"count", "min", "median", "max"} of ``values`` (the median of an even count is the mean
    of the middle two); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"count": len(ordered), "min": ordered[0], "median": median, "max": ordered[-1]}


def _size_stats(sizes: Sequence[tuple[int, int]]) -> dict[str, Any] | None:
    """{"count", "min", "median", "max"} of (width, height) sizes ordered by pixel count (ties
    by width); the median is the lower middle one, a size that occurs."""
    if not sizes:
        return None
    ordered = sorted(sizes, key=lambda wh: (wh[0] * wh[1], wh[0]))
    pick = lambda wh: list(wh)  # noqa: E731
    return {"count": len(ordered), "min": pick(ordered[0]), "median": pick(ordered[(len(ordered) - 1) // 2]),
            "max": pick(ordered[-1])}


@dataclass
class Summary:
    """Every shard's report, merged in shard order."""

    settings: Settings
    reports: list[ShardReport]
    index_missing: list[str]

    def __post_init__(self) -> None:
        self.good = sum(r.good for r in self.reports)
        self.samples = sum(r.samples for r in self.reports)
        self.lost = sum(r.lost for r in self.reports)
        self.bytes_read = sum(r.bytes_read for r in self.reports)
        self.bad: Counter[str] = Counter()
        self.extensions: Counter[str] = Counter()
        self.examples: dict[str, dict[str, Any]] = {}
        seen: dict[str, str] = {}
        self.duplicates: dict[str, list[str]] = {}
        self.split_keys = 0
        """Keys that occur more than once within one shard (its members are not consecutive)."""
        for report in self.reports:
            self.split_keys += sum(1 for count in Counter(report.keys).values() if count > 1)
            self.bad.update(report.bad)
            self.extensions.update(report.extensions)
            for reason, (key, detail) in report.examples.items():
                self.examples.setdefault(reason, {"shard": report.name, "key": key, "detail": detail})
            for key in report.keys:
                if key in seen:
                    self.duplicates.setdefault(key, [seen[key]]).append(report.name)
                else:
                    seen[key] = report.name
        self.previews = [p for r in self.reports for p in r.previews][: self.settings.previews]
        self.image_sizes = _size_stats([s for r in self.reports for s in r.image_sizes])
        self.caption_words = _percentile_stats([w for r in self.reports for w in r.caption_words])
        self.audio_seconds = _percentile_stats([s for r in self.reports for s in r.audio_seconds])
        self.questions = sum(r.questions for r in self.reports)
        self.mismatches = [r for r in self.reports if r.index_mismatch]

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def _extensions_ordered(self) -> list[tuple[str, int]]:
        """(extension, members) pairs, the most frequent first (ties by name)."""
        return sorted(self.extensions.items(), key=lambda item: (-item[1], item[0]))

    @property
    def exit_code(self) -> int:
        """0: everything is usable and the index is right; 1 otherwise."""
        return 1 if self.bad_total or self.mismatches or self.good == 0 else 0

    def to_json(self) -> dict[str, Any]:
        """The machine-readable summary (the ``--json`` line)."""
        return {
            "good": self.good,
            "bad": dict(sorted(self.bad.items())),
            "samples": self.samples,
            "lost": self.lost,
            "shards": len(self.reports),
            "shard_problems": [
                {
                    "shard": r.url, "samples": r.samples, "good": r.good, "bad": dict(sorted(r.bad.items())),
                    "bytes": r.bytes_read, "error": None if r.error is None else r.error[0],
                    "index": r.expected, "index_mismatch": r.index_mismatch,
                }  # fmt: skip
                for r in self.reports if r.has_problem
            ],
            "index_mismatches": [{"shard": r.url, "index": r.expected, "actual": r.samples} for r in self.mismatches],
            "index_missing": list(self.index_missing),
            "extensions": dict(self._extensions_ordered()),
            "bytes": self.bytes_read,
            "bad_examples": {reason: self.examples[reason] for reason in sorted(self.examples)},
            "duplicate_keys": {
                "count": len(self.duplicates),
                "within_shards": self.split_keys,
                "examples": [{"key": k, "shards": v} for k, v in list(self.duplicates.items())[:10]],
            },
            "image_sizes": self.image_sizes,
            "caption_words": self.caption_words,
            "audio_seconds": self.audio_seconds,
            "questions": self.questions,
            "decoder": self.settings.describe(),
            "examples": self.previews,
            "exit": self.exit_code,
        }

    def lines(self) -> Iterator[str]:
        """The human-readable report."""
        problems = [r for r in self.reports if r.has_problem]
        yield (f"{len(self.reports)} shards ({len(problems)} with problems), {self.samples} samples read, "
               f"{self.good} good, {self.bad_total} bad, {human_size(self.bytes_read)} read")
        if problems:
            width = max(len(r.name) for r in problems[:MAX_SHARD_LINES])
            yield "shards with problems:"
            for r in problems[:MAX_SHARD_LINES]:
                note = f"  {r.error[0]}" if r.error else ""
                if r.index_mismatch:
                    note += f"  index says {r.expected}"
                yield f"  {r.name:<{width}}  samples {r.samples:>7}  good {r.good:>7}  bad {r.bad_total:>7}  " \
                      f"{human_size(r.bytes_read):>9}{note}"
            if len(problems) > MAX_SHARD_LINES:
                yield f"  ... and {len(problems) - MAX_SHARD_LINES} more (--json lists them all)"
            yield f"  {'total':<{width}}  samples {self.samples:>7}  good {self.good:>7}  bad {self.bad_total:>7}  " \
                  f"{human_size(self.bytes_read):>9}"
        if self.bad:
            yield "bad samples by reason:"
            width = max(len(reason) for reason in self.bad)
            for reason, count in sorted(self.bad.items(), key=lambda item: (-item[1], item[0])):
                example = self.examples[reason]
                where = example["shard"] if example["key"] is None else f"{example['shard']} {example['key']!r}"
                yield f"  {reason:<{width}}  {count:>7}  e.g. {where}: {_short(example['detail'])}"
        if self.lost:
            yield f"  ({self.lost} of them counted for shard problems: the samples left unread, by the index, else 1)"
        for r in self.mismatches:
            yield f"index mismatch: {r.url}: the index says {r.expected} samples, the shard holds {r.samples}"
        if self.index_missing:
            shown = ", ".join(shard_name(url) for url in self.index_missing[:3])
            more = " ..." if len(self.index_missing) > 3 else ""
            yield (f"not in their index: {len(self.index_missing)} shards ({shown}{more}); training falls back to "
                   "dealing those sources out by shard")
        extensions = ", ".join(f"{ext} {count}" for ext, count in self._extensions_ordered())
        yield f"extensions: {extensions or 'none'}"
        if self.duplicates:
            key, shards = next(iter(self.duplicates.items()))
            yield f"duplicate keys: {len(self.duplicates)} keys occur more than once (e.g. {key!r} in {', '.join(shards)})"
            if self.split_keys:
                yield (f"  {self.split_keys} times within one shard: a sample's members are not consecutive there "
                       "(tar run without --sort=name?), so each part reads as a sample of its own")
        else:
            yield "duplicate keys: none"
        if self.image_sizes:
            s = self.image_sizes
            yield (f"image size (width x height, by pixels): min {_wh(s['min'])}, median {_wh(s['median'])}, "
                   f"max {_wh(s['max'])} ({s['count']} images)")
        if self.caption_words:
            s = self.caption_words
            yield f"caption words: min {s['min']}, median {s['median']:g}, max {s['max']} ({s['count']} captions)"
        if self.audio_seconds:
            s = self.audio_seconds
            yield (f"audio seconds: min {s['min']:.2f}, median {s['median']:.2f}, max {s['max']:.2f} "
                   f"({s['count']} clips)")
        yield f"samples with questions: {self.questions}"
        d = self.settings.describe()
        yield (f"decoded as training does: image_size {d['image_size']}, max_audio_seconds {d['max_audio_seconds']:g}, "
               f"extras {', '.join(d['extras']) or 'none'}, pairs {', '.join(d['pairs'])}")
        if self.previews:
            yield "decoded samples:"
            for p in self.previews:
                parts = [f"{p['shard']} {p['key']!r}"]
                if p["caption"] is not None:
                    parts.append(f"caption {_short(p['caption'], 80)!r}")
                if p["question"] is not None:
                    parts.append(f"question {_short(p['question'], 60)!r} answer {p['answer']!r}")
                parts.append("image " + ("x".join(str(n) for n in p["image"]) if p["image"] else "none"))
                parts.append("audio " + (f"{p['audio_seconds']:.2f} s" if p["audio_seconds"] is not None else "none"))
                yield "  " + "  ".join(parts)
        if self.exit_code == 0:
            yield f"OK: all {self.good} samples are usable"
        elif self.good == 0 and not self.bad_total and not self.mismatches:
            yield "PROBLEM: the shards hold no samples"
        else:
            found = []
            if self.bad_total:
                found.append(f"{self.bad_total} bad samples ({', '.join(f'{k} {v}' for k, v in sorted(self.bad.items()))})")
            if self.mismatches:
                found.append(f"{len(self.mismatches)} index mismatches")
            if self.good == 0:
                found.append("no usable sample")
            yield "PROBLEM: " + "; ".join(found)


def _wh(size: Sequence[int]) -> str:
    return f"{size[0]}x{size[1]}"


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human_size(nbytes: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inspect_shards.py",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 all good, 1 bad samples or shards or a wrong index, 2 usage error. "
               "See the module docstring of tools/inspect_shards.py for the output.",
    )
    parser.add_argument("specs", nargs="*", metavar="SPEC",
                        help="shards: brace pattern, glob, directory, file, pipe:COMMAND, or a comma list of these")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    parser.add_argument("--config", nargs="+", metavar=("RECIPE_OR_YAML", "KEY=VALUE"),
                        help=f"decode as this recipe (or YAML file) with these overrides (default: {DEFAULT_RECIPE})")
    parser.add_argument("--image-size", type=_positive_int, metavar="N",
                        help="images decode to N x N (default: the recipe's)")
    parser.add_argument("--max-audio-seconds", type=_positive_float, metavar="S",
                        help="audio is cut to S seconds, a multiple of 0.1 (default: the recipe's)")
    parser.add_argument("--audio", action=argparse.BooleanOptionalAction, default=None,
                        help="read and check audio members (default: when the recipe's model has audio)")
    parser.add_argument("--questions", action=argparse.BooleanOptionalAction, default=None,
                        help="read and check questions (default: when the recipe trains VQA)")
    parser.add_argument("--pairs", metavar="PAIR,...",
                        help=f"modality pairs that make a sample usable, of {','.join(PAIRS)} (default: the recipe's)")
    parser.add_argument("--index", metavar="SIZES_JSON",
                        help=f"the index to compare counts with, for every shard "
                             f"(default: the {SIZES_FILE} beside each local shard)")
    parser.add_argument("--samples", type=_non_negative_int, default=3, metavar="K",
                        help="decoded samples to show (default 3)")
    parser.add_argument("--workers", type=_positive_int, default=1, metavar="W", help="parallel processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments; a SPEC placed after ``--config``'s overrides (no ``=``) is moved back
    among the specifications. Raises SystemExit(2) on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        recipe, *rest = args.config
        args.config = [recipe, *(item for item in rest if "=" in item)]
        args.specs = [*args.specs, *(item for item in rest if "=" not in item)]
    if not args.specs:
        parser.error("give at least one SPEC (shard file, directory, glob, brace pattern or pipe:COMMAND)")
    return args


def inspect(specs: Sequence[str], settings: Settings, workers: int = 1, index: str | None = None,
            progress: bool = True) -> Summary:
    """Inspect every shard of ``specs``.

    Raises:
        ConfigError: a specification matches nothing or is malformed.
    """
    urls = expand_shards(list(specs), FIELD_NAME)
    expected, missing = index_counts(urls, index)
    jobs = list(zip(urls, expected))
    reports: list[ShardReport] = []
    with tqdm(total=len(jobs), unit="shard", desc="inspecting", file=sys.stderr, disable=not progress) as bar:
        for report in iter_reports(jobs, settings, workers):
            reports.append(report)
            bar.update(1)
            if report.error is not None:
                logger.warning("%s: %s (%s)", report.url, report.error[1], report.error[0])
    return Summary(settings, reports, missing)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns the exit status (0 all good, 1 problems found, 2 usage error)."""
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    tqdm.monitor_interval = 0  # no monitor thread to be copied into forked workers
    try:
        settings = resolve_settings(args)
        if args.index is not None and not os.path.isfile(args.index):
            raise UsageError(f"--index {args.index}: no such file")
        summary = inspect(args.specs, settings, args.workers, args.index, progress=not args.quiet)
    except (UsageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in summary.lines():
        print(line)
    if args.json:
        print(json.dumps(summary.to_json(), sort_keys=False))
    sys.stdout.flush()
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
