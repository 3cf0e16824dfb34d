"""A synthetic, learnable multi-modal dataset written as WebDataset shards.

Every image shows one coloured shape on a dark, noisy background. The caption names the
shape's colour, kind and position (with varied wording and synonyms), so a contrastive model can
learn to match them. Most samples also have a short sound that encodes the same attributes, and
every sample has question-answer pairs about them. Layout written by :func:`write_demo_dataset`::

    out_dir/train/shard-000000.tar ...   samples train-000000, train-000001, ...
    out_dir/eval/shard-000000.tar        samples eval-000000, ... (each attribute combination once)
    out_dir/{train,eval}/sizes.json      samples per shard (the convention OpenCLIP reads too)
    out_dir/manifest.json                counts, parameters, the answer vocabulary; "complete" once
                                         every shard is written

Each sample has ``png`` (RGB image), ``txt`` (caption), ``json`` (attributes, with ``audio``
describing the sound or null) and ``qa.json``; a fraction of them (``audio_fraction`` of the
training samples, every evaluation sample) has ``wav``.

Attributes: colour (8), shape (4), position (5) and size (3 classes of the drawn scale, which
varies continuously in [0.8, 1.2]: small below 0.9, large above 1.1).

Sound (``wav``): 16 kHz mono 16-bit PCM (:mod:`megamm.data.audio`), 0.4-0.6 s long (uniform per
sample), sine beeps over white noise:

* pitch from the colour: :data:`PITCHES_HZ`, 250 Hz times 2 ** (6 k / 12) for the k-th colour
  (red 250, green 354, blue 500, yellow 707, cyan 1000, magenta 1414, white 2000, orange 2828 Hz;
  a tritone apart), jittered by up to +-0.4 semitone per sample;
* rhythm from the shape: :data:`BEEPS`, circle 1, square 2, triangle 3, cross 4 beeps, one
  centred in each equal slot of the clip (position jittered), each sounding 55-75% of its slot;
* pitch contour over the clip from the position: :data:`CONTOUR_OF`, top rising (-2 -> +2
  semitones), bottom falling (+2 -> -2), center steady, left vibrato (+-1.5 semitones at 5 Hz),
  right arch (-2 -> +2 -> -2); the pitch never strays more than 2.4 semitones from the colour's,
  half the distance to the next colour's;
* loudness from the size: peak level ``-7 + 30 (scale - 1)`` dBFS, from -13 dBFS (scale 0.8) to
  -1 dBFS (1.2); small is below -10 dBFS, large above -4 dBFS;
* white noise of standard deviation 0.005-0.03 (uniform per sample).

Questions (``qa.json``): a JSON list of four ``{"kind", "question", "answer"}`` objects, one per
kind: ``colour`` ("what colour is the box?" -> "red"), ``shape`` ("what shape is on the left?"
-> "square"), ``position`` ("where is the red shape?" -> "left") and ``size`` ("how big is the
red square?" -> "small"), each in a random wording that never names the answer. Every answer is
a word of :data:`ANSWER_VOCAB` (colours, shapes, positions, sizes), which the manifest lists too.

Images and captions come from each shard's own RNG streams, as in format 1 (they are unchanged);
the sound, its presence and the questions from a separate seed per sample,
``(seed, 2, split, sample index)``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from megamm.data.audio import SAMPLE_RATE, encode_wav, synthesize_beeps
from megamm.data.shards import SIZES_FILE
from megamm.fileio import atomic_output

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""2: samples gained ``wav`` and ``qa.json`` (images and captions are those of version 1)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 200, 55),
    "blue": (45, 85, 245),
    "yellow": (240, 225, 40),
    "cyan": (35, 215, 225),
    "magenta": (215, 45, 220),
    "white": (240, 240, 240),
    "orange": (250, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
POSITIONS: dict[str, tuple[float, float]] = {
    # (x, y) of the shape's centre as a fraction of the image side.
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
MAX_EVAL_SAMPLES = len(COLOURS) * len(SHAPES) * len(POSITIONS)

ANSWER_VOCAB: tuple[str, ...] = (*COLOURS, *SHAPES, *POSITIONS, *SIZES)
"""Every answer of the demo's questions; an answer's index here is its class."""

DEFAULT_AUDIO_FRACTION = 0.75
"""Training samples with a sound (each independently); every evaluation sample has one."""
PITCHES_HZ: dict[str, float] = {colour: 250.0 * 2.0 ** (6 * k / 12) for k, colour in enumerate(COLOURS)}
BEEPS: dict[str, int] = {"circle": 1, "square": 2, "triangle": 3, "cross": 4}
CONTOUR_OF: dict[str, str] = {
    "top": "rising", "bottom": "falling", "center": "steady", "left": "vibrato", "right": "arch"
}
AUDIO_SECONDS = (0.4, 0.6)
_PITCH_JITTER = 0.4  # semitones
_DUTY_RANGE = (0.55, 0.75)
_NOISE_STD_RANGE = (0.005, 0.03)

_SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus sign"),
}
_WHERE: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side", "at the left of the image", "in the left half"),
    "right": ("on the right", "on the right side", "at the right of the image", "in the right half"),
    "top": ("at the top", "near the top of the image", "in the upper part", "in the top half"),
    "bottom": ("at the bottom", "near the bottom of the image", "in the lower part", "in the bottom half"),
    "center": (
        "in the center", "in the middle", "at the center of the image", "in the middle of the picture"
    ),
}
_LABELS: dict[str, tuple[str, ...]] = {
    "left": ("left",),
    "right": ("right",),
    "top": ("top", "upper"),
    "bottom": ("bottom", "lower"),
    "center": ("center", "middle"),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("",),
    "large": ("large", "big"),
}
_TEMPLATES: tuple[str, ...] = (
    "{a_obj} {where}",
    "there is {a_obj} {where}",
    "{label}: {a_obj}",
    "an image of {a_obj} {where}",
    "{a_obj} {where} on a dark background",
    "the {shape} {where} is {colour}",
    "{where}, {a_obj}",
    "a picture showing {a_obj} {where}",
)

# Question wordings by kind; none names the answer ({shape} and {where} are the caption's synonyms).
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": (
        "what colour is the {shape}?",
        "what color is the {shape}?",
        "which colour is the shape {where}?",
        "what is the colour of the {shape} {where}?",
        "what colour does the {shape} have?",
    ),
    "shape": (
        "what shape is {where}?",
        "which shape is shown?",
        "what is the {colour} shape?",
        "what kind of shape is {where}?",
        "what shape is the {colour} object?",
    ),
    "position": (
        "where is the {colour} {shape}?",
        "where is the {colour} shape?",
        "in which part of the image is the {shape}?",
        "where in the picture is the {colour} object?",
    ),
    "size": (
        "how big is the {colour} {shape}?",
        "what size is the {shape} {where}?",
        "is the {colour} {shape} small, medium or large?",
        "how large is the shape {where}?",
    ),
}

_RADIUS = 0.16  # shape half-extent as a fraction of the image side, before size jitter
_SCALE_RANGE = (0.8, 1.2)
_CENTRE_JITTER = 0.05  # fraction of the image side
_COLOUR_JITTER = 18
_BACKGROUND_MAX = 56  # background pixels are uniform in [0, _BACKGROUND_MAX)


class _ShardRng:
    """Random sources of one shard: numpy for pixel arrays, Python's Random for scalar choices.

    Both are derived from ``(seed, *stream)`` only, so every shard is reproducible on its own.
    """

    def __init__(self, seed: int, *stream: int) -> None:
        array_seed, scalar_seed = np.random.SeedSequence([seed % 2**64, *stream]).spawn(2)
        self.arrays = np.random.default_rng(array_seed)
        self.scalars = random.Random(int(scalar_seed.generate_state(1, np.uint64)[0]))


def _size_class(scale: float) -> str:
    if scale < 0.9:
        return "small"
    if scale > 1.1:
        return "large"
    return "medium"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_caption(rng: random.Random, colour: str, shape: str, position: str, size: str) -> str:
    """A random wording of the attributes; every wording names colour, shape and position."""
    shape_word = rng.choice(_SHAPE_WORDS[shape])
    size_word = rng.choice(_SIZE_WORDS[size]) if rng.random() < 0.7 else ""
    obj = " ".join(w for w in (size_word, colour, shape_word) if w)
    return rng.choice(_TEMPLATES).format(
        a_obj=_with_article(obj),
        where=rng.choice(_WHERE[position]),
        label=rng.choice(_LABELS[position]),
        shape=shape_word,
        colour=colour,
    )


def _shape_mask(size: int, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """(H, W) bool: pixels covered by the shape."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        h = r * 0.9  # about the circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=255)
    elif shape == "cross":
        t = max(r * 0.35, 1.0)
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return np.asarray(mask) > 0


def render_image(
    rng: random.Random, noise: np.ndarray, colour: str, shape: str, position: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one image; returns (H, W, 3) uint8 pixels and the attributes actually drawn.

    Args:
        rng: source of the size, position and colour jitter.
        noise: (H, W, 3) uint8 dark background; pixel noise for the shape is taken from it too.
    """
    size = noise.shape[0]
    scale = rng.uniform(*_SCALE_RANGE)
    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)) * size
    cy = (fy + rng.uniform(-_CENTRE_JITTER, _CENTRE_JITTER)) * size
    rgb = [min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in COLOURS[colour]]
    mask = _shape_mask(size, shape, cx, cy, _RADIUS * scale * size)  # (H, W)
    # Shape pixels: the colour plus zero-mean noise of +-_BACKGROUND_MAX/2 scaled down.
    shaded = np.asarray(rgb, dtype=np.int16) + (noise.astype(np.int16) - _BACKGROUND_MAX // 2) // 3
    pixels = np.where(mask[..., None], np.clip(shaded, 0, 255), noise).astype(np.uint8)  # (H, W, 3)
    attributes = {
        "colour": colour,
        "shape": shape,
        "position": position,
        "size": _size_class(scale),
        "scale": round(scale, 4),
        "center_xy": [round(cx, 2), round(cy, 2)],
        "rgb": rgb,
    }
    return pixels, attributes


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def render_sound(
    rng: np.random.Generator, colour: str, shape: str, position: str, scale: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """The sound of a sample (the mapping is in the module docstring): (S,) int16 samples at
    :data:`~megamm.data.audio.SAMPLE_RATE` and a description of what was rendered."""
    pitch = PITCHES_HZ[colour] * 2.0 ** (rng.uniform(-_PITCH_JITTER, _PITCH_JITTER) / 12.0)
    seconds = rng.uniform(*AUDIO_SECONDS)
    level_db = -7.0 + 30.0 * (scale - 1.0)
    pcm = synthesize_beeps(
        rng,
        pitch_hz=pitch,
        contour=CONTOUR_OF[position],
        beeps=BEEPS[shape],
        level_db=level_db,
        seconds=seconds,
        duty=rng.uniform(*_DUTY_RANGE),
        noise_std=rng.uniform(*_NOISE_STD_RANGE),
    )
    description = {
        "pitch_hz": round(pitch, 2),
        "beeps": BEEPS[shape],
        "contour": CONTOUR_OF[position],
        "level_db": round(level_db, 2),
        "samples": int(pcm.shape[0]),
        "sample_rate": SAMPLE_RATE,
    }
    return pcm, description


def make_questions(
    rng: np.random.Generator, colour: str, shape: str, position: str, size: str
) -> list[dict[str, str]]:
    """One question per kind (colour, shape, position, size), randomly worded, with its answer."""
    answers = {"colour": colour, "shape": shape, "position": position, "size": size}
    pairs = []
    for kind, templates in _QUESTIONS.items():
        question = _pick(rng, templates).format(
            shape=_pick(rng, _SHAPE_WORDS[shape]), where=_pick(rng, _WHERE[position]), colour=colour
        )
        pairs.append({"kind": kind, "question": question, "answer": answers[kind]})
    return pairs


def sample_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of sample ``index`` of ``split``'s sound, its presence and its questions."""
    return np.random.SeedSequence([seed % 2**64, 2, ("train", "eval").index(split), index])


def make_sample(
    rng: random.Random,
    noise: np.ndarray,
    key: str,
    colour: str,
    shape: str,
    position: str,
    extras: np.random.SeedSequence,
    audio_fraction: float = 1.0,
) -> dict[str, Any]:
    """A WebDataset sample ``{"__key__", "png", "txt", "json", "qa.json"}`` (and ``"wav"`` with
    probability ``audio_fraction``) with bytes values.

    ``noise`` is the (H, W, 3) uint8 background; see :func:`render_image`. ``rng`` draws the
    image and caption; ``extras`` (:func:`sample_seed`) the sound, its presence and the questions.
    """
    pixels, attributes = render_image(rng, noise, colour, shape, position)
    caption = make_caption(rng, colour, shape, position, attributes["size"])
    attributes["caption"] = caption
    presence_seed, sound_seed, question_seed = extras.spawn(3)
    sample: dict[str, Any] = {"__key__": key, "png": _png_bytes(pixels), "txt": caption.encode("utf-8")}
    attributes["audio"] = None
    if np.random.default_rng(presence_seed).random() < audio_fraction:
        pcm, attributes["audio"] = render_sound(
            np.random.default_rng(sound_seed), colour, shape, position, attributes["scale"]
        )
        sample["wav"] = encode_wav(pcm)
    questions = make_questions(np.random.default_rng(question_seed), colour, shape, position, attributes["size"])
    sample["json"] = json.dumps(attributes, sort_keys=True).encode("utf-8")
    sample["qa.json"] = json.dumps(questions).encode("utf-8")
    return sample


def _backgrounds(rng: _ShardRng, count: int, image_size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 dark noisy backgrounds, drawn in one call for speed."""
    return rng.arrays.integers(0, _BACKGROUND_MAX, (count, image_size, image_size, 3), dtype=np.uint8)


def _write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write samples to ``path`` atomically; returns how many were written."""
    count = 0
    with atomic_output(path) as handle:
        # Integer mtime keeps plain ustar headers (a float adds a pax header per member).
        with wds.TarWriter(handle, encoder=False, mtime=0, mode=0o644) as writer:  # type: ignore[arg-type]
            for sample in samples:
                writer.write(sample)
                count += 1
    return count


def _train_samples(
    seed: int, shard: int, samples_per_shard: int, image_size: int, audio_fraction: float
) -> Iterator[dict[str, Any]]:
    rng = _ShardRng(seed, 0, shard)
    backgrounds = _backgrounds(rng, samples_per_shard, image_size)
    colours, positions = list(COLOURS), list(POSITIONS)
    for i in range(samples_per_shard):
        colour = rng.scalars.choice(colours)
        shape = rng.scalars.choice(SHAPES)
        position = rng.scalars.choice(positions)
        index = shard * samples_per_shard + i
        extras = sample_seed(seed, "train", index)
        yield make_sample(
            rng.scalars, backgrounds[i], f"train-{index:06d}", colour, shape, position, extras, audio_fraction
        )


def _eval_samples(seed: int, count: int, image_size: int) -> Iterator[dict[str, Any]]:
    """``count`` samples, each (colour, shape, position) at most once, with their own RNG stream;
    every one has a sound."""
    rng = _ShardRng(seed, 1)
    backgrounds = _backgrounds(rng, count, image_size)
    combos = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    rng.scalars.shuffle(combos)
    for i, (colour, shape, position) in enumerate(combos[:count]):
        extras = sample_seed(seed, "eval", i)
        yield make_sample(rng.scalars, backgrounds[i], f"eval-{i:06d}", colour, shape, position, extras, 1.0)


@dataclasses.dataclass(frozen=True)
class _ShardJob:
    """One shard to write: ``split`` is "train" (shard ``index``) or "eval"."""

    path: Path
    split: str
    index: int
    count: int
    image_size: int
    seed: int
    audio_fraction: float

    def run(self) -> int:
        if self.split == "train":
            samples = _train_samples(self.seed, self.index, self.count, self.image_size, self.audio_fraction)
        else:
            samples = _eval_samples(self.seed, self.count, self.image_size)
        return _write_shard(self.path, samples)


def _run_job(job: _ShardJob) -> int:
    return job.run()


def _run_jobs(jobs: list[_ShardJob], workers: int) -> list[int]:
    """Run shard jobs, in forked processes where available; returns the sample counts."""
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [job.run() for job in jobs]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_run_job, jobs))


def _shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _shard_files(directory: Path) -> list[Path]:
    """``shard-NNNNNN.tar`` files in ``directory`` (the names this generator writes)."""
    return sorted(p for p in directory.glob("shard-*.tar") if re.fullmatch(r"shard-\d{6}\.tar", p.name))


def _written_files(root: Path) -> set[str]:
    """Files under ``root`` (relative) with the names a generation writes: shards and sizes tables."""
    found = {str(p.relative_to(root)) for split in ("train", "eval") for p in _shard_files(root / split)}
    return found | {f"{split}/{SIZES_FILE}" for split in ("train", "eval") if (root / split / SIZES_FILE).exists()}


def _owned_shards(manifest_path: Path) -> set[str]:
    """Shards (relative paths) that an earlier generation listed in its manifest, finished or not."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict) or "format_version" not in manifest.get("params", {}):
        return set()
    listed = [rel for split in ("train", "eval") for rel in manifest.get(split, {}).get("shards", [])]
    sizes = [manifest[split]["sizes"] for split in ("train", "eval") if "sizes" in manifest.get(split, {})]
    return {str(rel) for rel in listed + sizes + manifest.get("claimed", [])}


class ForeignFilesError(ValueError):
    """The output directory holds shards this generator did not write."""


def _check_ownership(root: Path, force: bool) -> list[str]:
    """Refuse shards under ``root`` that this generator did not write, unless ``force``.

    A generation overwrites or deletes every ``shard-NNNNNN.tar`` under ``train/`` and
    ``eval/``. A shard is ours when an earlier generation's manifest (complete or in progress)
    lists it. Returns the foreign shards that ``force`` lets us replace.
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"output {root} is a file; name a directory (e.g. --out demo_data)")
    foreign = sorted(_written_files(root) - _owned_shards(root / "manifest.json"))
    if foreign and not force:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ForeignFilesError(
            f"{root} holds {len(foreign)} file(s) this generator did not write ({shown}); they would be "
            f"overwritten or deleted. Choose another output directory, or pass --force to replace them"
        )
    return foreign


def _read_reusable_manifest(manifest_path: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The existing manifest if it was written with ``params`` and all its shards exist."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("params") != params or manifest.get("complete") is False:
        return None
    root = manifest_path.parent
    for split in ("train", "eval"):
        entry = manifest.get(split)
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not shards or not all((root / str(rel)).is_file() for rel in shards):
            return None
        if not (root / str(entry.get("sizes", ""))).is_file():
            return None  # written before sizes tables existed
    return manifest


def _validate_params(
    train_shards: int, samples_per_shard: int, eval_samples: int, image_size: int, audio_fraction: float
) -> None:
    if train_shards < 1:
        raise ValueError(f"train_shards={train_shards} must be >= 1")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if not 1 <= eval_samples <= MAX_EVAL_SAMPLES:
        raise ValueError(
            f"eval_samples={eval_samples} must be in [1, {MAX_EVAL_SAMPLES}]: the eval split holds each "
            f"(colour, shape, position) combination at most once"
        )
    if image_size < 8:
        raise ValueError(f"image_size={image_size} must be >= 8 to draw recognisable shapes")
    if not 0.0 <= audio_fraction <= 1.0:
        raise ValueError(f"audio_fraction={audio_fraction} must be in [0, 1]")


def write_demo_dataset(
    out_dir: str | Path,
    train_shards: int = 8,
    samples_per_shard: int = 1024,
    eval_samples: int = 160,
    image_size: int = 32,
    seed: int = 0,
    *,
    workers: int | None = None,
    force: bool = False,
    audio_fraction: float = DEFAULT_AUDIO_FRACTION,
) -> dict[str, Any]:
    """Write the synthetic dataset under ``out_dir``, or reuse an identical earlier one.

    The output is a pure function of the arguments. ``manifest.json`` is written last, so an
    interrupted run is regenerated by the next call; if it already exists with the same
    parameters and all its shards are present, nothing is written.

    Only shards that an earlier generation wrote (listed in its manifest) are ever replaced or
    deleted; any other ``shard-NNNNNN.tar`` under ``train/`` or ``eval/`` is refused
    (:class:`ForeignFilesError`) unless ``force``, which logs each one it replaces.

    Args:
        workers: processes writing shards in parallel (default: one per CPU); the output does
            not depend on it.
        force: replace shards this generator did not write.
        audio_fraction: the chance that a training sample has a sound (every evaluation sample
            has one).

    Returns:
        The manifest (``params``, ``train``/``eval`` with ``pattern``, ``shards`` relative to
        ``out_dir`` and ``samples``, ``attributes``, ``answers`` (:data:`ANSWER_VOCAB`) and
        ``audio``) plus ``reused``: whether it was reused.
    """
    _validate_params(train_shards, samples_per_shard, eval_samples, image_size, audio_fraction)
    root = Path(out_dir)
    manifest_path = root / "manifest.json"
    params = {
        "format_version": FORMAT_VERSION,
        "train_shards": train_shards,
        "samples_per_shard": samples_per_shard,
        "eval_samples": eval_samples,
        "image_size": image_size,
        "seed": seed,
        "audio_fraction": audio_fraction,
    }
    existing = _read_reusable_manifest(manifest_path, params)
    if existing is not None:
        return {**existing, "reused": True}

    train_names = [_shard_name(i) for i in range(train_shards)]
    train_shard_paths = [f"train/{name}" for name in train_names]
    eval_shard_paths = [f"eval/{_shard_name(0)}"]
    for foreign in _check_ownership(root, force):
        logger.warning("--force: replacing or deleting %s, which this generator did not write", root / foreign)
    # Claim every shard this generation may touch, before touching any: an interrupted run
    # leaves an incomplete manifest (never reused), and the next run knows these files are ours.
    sizes_paths = [f"train/{SIZES_FILE}", f"eval/{SIZES_FILE}"]
    claimed = sorted(set(train_shard_paths + eval_shard_paths + sizes_paths) | _owned_shards(manifest_path))
    in_progress = {"params": params, "complete": False, "claimed": claimed}
    with atomic_output(manifest_path) as handle:
        handle.write((json.dumps(in_progress, indent=2) + "\n").encode("utf-8"))
    jobs = [
        _ShardJob(root / "eval" / _shard_name(0), "eval", 0, eval_samples, image_size, seed, 1.0),
        *(
            _ShardJob(root / "train" / name, "train", i, samples_per_shard, image_size, seed, audio_fraction)
            for i, name in enumerate(train_names)
        ),
    ]
    counts = _run_jobs(jobs, workers or os.cpu_count() or 1)
    eval_count = counts[0]
    for split, names, split_counts in (("eval", [_shard_name(0)], counts[:1]), ("train", train_names, counts[1:])):
        with atomic_output(root / split / SIZES_FILE) as handle:
            handle.write((json.dumps(dict(zip(names, split_counts)), indent=2) + "\n").encode("utf-8"))
    keep = set(train_shard_paths + eval_shard_paths)
    for split in ("train", "eval"):
        for path in _shard_files(root / split):
            if str(path.relative_to(root)) not in keep:
                path.unlink()  # left by an earlier, larger generation (or replaced under --force)

    manifest: dict[str, Any] = {
        "params": params,
        "complete": True,
        "train": {
            "pattern": f"train/shard-{{000000..{train_shards - 1:06d}}}.tar",
            "shards": train_shard_paths,
            "sizes": f"train/{SIZES_FILE}",
            "samples": train_shards * samples_per_shard,
        },
        "eval": {
            "pattern": "eval/shard-{000000..000000}.tar",
            "shards": eval_shard_paths,
            "sizes": f"eval/{SIZES_FILE}",
            "samples": eval_count,
        },
        "attributes": {
            "colours": list(COLOURS), "shapes": list(SHAPES), "positions": list(POSITIONS), "sizes": list(SIZES)
        },
        "answers": list(ANSWER_VOCAB),
        "audio": {
            "sample_rate": SAMPLE_RATE,
            "seconds": list(AUDIO_SECONDS),
            "train_fraction": audio_fraction,
            "eval_fraction": 1.0,
            "pitches_hz": {colour: round(hz, 2) for colour, hz in PITCHES_HZ.items()},
            "beeps": BEEPS,
            "contours": CONTOUR_OF,
        },
    }
    with atomic_output(manifest_path) as handle:
        handle.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return {**manifest, "reused": False}

