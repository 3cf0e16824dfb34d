"""Training and evaluation loaders over WebDataset image-caption shards, with optional audio and
question-answer pairs.

Training data is read as ``dp_size * W`` independent, deterministic streams
(``W = max(data.num_workers, 1)`` DataLoader workers per data-parallel rank). Stream
``s = dp_rank * W + worker`` owns the shards ``shards[s::dp_size * W]``; per epoch it shuffles
its shard order and then its samples (in a buffer of ``data.shuffle_buffer``), both with RNGs
seeded from ``(data.seed, epoch, s)``, and builds whole micro-batches inside the worker. The
DataLoader hands out batches round-robin over workers, so global batch ``i`` comes from worker
``i % W``. Ranks that share a data-parallel index (tensor-parallel peers) therefore see
identical batches.

A sample is usable if it has a non-empty UTF-8 ``txt`` caption and an image (``png``, ``jpg``,
``jpeg`` or ``webp``) whose header can be read; such a sample is a *candidate*. Unusable
samples, broken tar members and candidates whose pixels do not decode are skipped and counted
in the ``skipped`` field of the next batch.

A sample may also have a ``wav`` (16 kHz 16-bit PCM, :mod:`megamm.data.audio`) and a ``qa.json``
(a JSON list of ``{"question", "answer"}`` objects, as the demo dataset writes); either may be
missing, and the batch says which rows have them. A ``wav`` or ``qa.json`` that cannot be read
makes the sample a bad one (the header and the JSON are checked when screening, the samples when
decoding). Audio longer than :data:`MAX_AUDIO_SAMPLES` is cut to it. A loader reads only the
extras it is asked for (``extras``, a subset of :data:`EXTRAS`): a model without an audio encoder
neither decodes nor screens ``wav``, its batches' audio fields hold no rows' audio, and likewise for
``qa.json``. Each sample contributes one
question per pass: pair ``blake2b(seed, epoch, key) mod n`` of its ``n``, so a sample's question
depends only on the data seed, the pass and the sample (not on the streams, the decoding or the
resume point).

The data position (:class:`DataPosition`) is exact: each batch says which stream made it and
how many candidates that stream had consumed when it did. Resuming skips exactly that many
candidates per stream (screening raw samples without decoding them, so it is cheap) and starts
the round robin at the batch count, so a resumed run sees the batches the uninterrupted run
would have seen. The position counts candidates, not batches, so it stays exact across
undecodable images and across a change of ``micro_batch_size``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megamm.config import ConfigError, DataConfig
from megamm.data.audio import SAMPLE_RATE, WavError, decode_wav, pcm_to_float, wav_info
from megamm.data.demo import ANSWER_VOCAB
from megamm.data.shards import expand_shards, iter_tar_samples
from megamm.data.tokenizer import BOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_MAX_WARNINGS = 5

MAX_AUDIO_SECONDS = 1.0
"""Audio is cut to ``data.max_audio_seconds``, by default this length."""
MAX_AUDIO_SAMPLES = int(MAX_AUDIO_SECONDS * SAMPLE_RATE)
AUDIO_PAD_MULTIPLE = 1600
"""A batch's audio is padded to its longest clip rounded up to a multiple of this (0.1 s), at least
one multiple: few distinct shapes, never an empty one. :data:`MAX_AUDIO_SAMPLES` is a multiple."""
EXTRAS = ("audio", "qa")
"""What a sample may carry beside its image and caption: ``wav`` and ``qa.json``."""
ANSWER_INDEX: dict[str, int] = {answer: index for index, answer in enumerate(ANSWER_VOCAB)}
NO_ANSWER = -1
"""``answer`` of a row without a question, or whose answer is not in the vocabulary: ignore it."""
ROW_FIELDS = (
    "image", "text_ids", "text_mask", "audio", "audio_lengths", "has_audio",
    "question_ids", "question_mask", "answer", "answer_ids", "answer_mask",
)
"""The tensor fields of a :class:`Batch`, one row per sample."""


class Batch(TypedDict):
    """One batch of image-caption pairs, with audio and a question where the samples have them."""

    image: torch.Tensor
    """(B, 3, H, W) float32, pixel values mapped to [-1, 1]: (x / 255 - 0.5) / 0.5."""
    text_ids: torch.Tensor
    """(B, T) int64 token ids: BOS, pieces, EOS, then padding."""
    text_mask: torch.Tensor
    """(B, T) bool, True for real tokens (BOS and EOS included)."""
    audio: torch.Tensor
    """(B, S) float32 16 kHz mono waveforms in [-1, 1), zero after each row's length; S is the
    longest clip rounded up to a multiple of :data:`AUDIO_PAD_MULTIPLE` (at least one)."""
    audio_lengths: torch.Tensor
    """(B,) int64 valid samples of each row's audio (0 when it has none)."""
    has_audio: torch.Tensor
    """(B,) bool, True for rows with audio."""
    question_ids: torch.Tensor
    """(B, T) int64 ids of the question (encoded as captions are); all padding without one."""
    question_mask: torch.Tensor
    """(B, T) bool, True for the question's real tokens; all False without a question."""
    answer: torch.Tensor
    """(B,) int64 index of the answer in :data:`~megamm.data.demo.ANSWER_VOCAB`, or
    :data:`NO_ANSWER` (-1: no question, or an answer outside the vocabulary)."""
    answer_ids: torch.Tensor
    """(B, T) int64 ids of the answer text (BOS, pieces, EOS, padding), for generated answers."""
    answer_mask: torch.Tensor
    """(B, T) bool, True for the answer's real tokens; all False without a question."""
    keys: list[str]
    """Sample keys, one per row."""
    skipped: int
    """Bad samples and broken tar members skipped while producing this batch."""
    stream: int
    """The training stream that made this batch (-1 for evaluation batches)."""
    position: int
    """Candidates that stream had consumed, this batch included (its data position)."""
    epoch: int
    """The stream's pass over its shards (0 first) when it made this batch."""


@dataclass
class DataPosition:
    """Where one data-parallel rank's training data stands: what resuming needs to continue exactly."""

    batches: int = 0
    """Micro-batches taken from this rank's loader (all its workers); sets the round-robin phase."""
    streams: dict[int, int] = field(default_factory=dict)
    """Candidates consumed, by stream id; a stream not listed starts at 0."""

    def advance(self, batch: Batch) -> None:
        """Record that ``batch`` has been taken."""
        self.batches += 1
        self.streams[int(batch["stream"])] = int(batch["position"])


# ----------------------------------------------------------------------------------------------
# Screening, decoding and collation


@dataclass(frozen=True)
class _Candidate:
    """A raw sample that passed the cheap pre-decode check."""

    key: str
    image_bytes: bytes
    caption: str
    audio_bytes: bytes | None = None
    """The ``wav``, its header checked; None: no audio."""
    questions: tuple[tuple[str, str], ...] = ()
    """(question, answer) pairs of ``qa.json``."""


class _SkipLog:
    """Counts bad samples since the last batch and logs the first few of them."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.pending = 0
        self.total = 0

    def add(self, message: str) -> None:
        self.pending += 1
        self.total += 1
        if self.total <= _MAX_WARNINGS:
            suffix = "; further bad samples are counted silently" if self.total == _MAX_WARNINGS else ""
            logger.warning("%s: skipping bad sample: %s%s", self.where, message, suffix)

    def handler(self, exn: Exception) -> bool:
        """WebDataset error handler: count, log, continue."""
        self.add(f"unreadable tar data: {exn!r}")
        return True

    def take(self) -> int:
        """The count since the last call."""
        count, self.pending = self.pending, 0
        return count


def _check_extras(extras: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(extras)
    if not chosen <= set(EXTRAS):
        raise ValueError(f"extras {sorted(chosen - set(EXTRAS))} are not among {EXTRAS}")
    return chosen


def _screen(sample: dict[str, Any], extras: frozenset[str] = frozenset(EXTRAS)) -> _Candidate | str:
    """The sample as a candidate, or the reason it is unusable. Reads only the image header, and
    of the ``extras``, the wav header and the questions."""
    caption_bytes = sample.get("txt")
    if caption_bytes is None:
        return "no 'txt' caption"
    try:
        caption = bytes(caption_bytes).decode("utf-8").strip()
    except UnicodeDecodeError:
        return "caption is not UTF-8"
    if not caption:
        return "empty caption"
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if extension is None:
        return f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)})"
    image_bytes = bytes(sample[extension])
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            width, height = image.size
    except Exception as err:  # PIL raises many types on malformed input
        return f"undecodable {extension} ({type(err).__name__})"
    if width < 1 or height < 1:
        return f"empty {extension} ({width}x{height})"
    audio_bytes = None
    if "wav" in sample and "audio" in extras:
        audio_bytes = bytes(sample["wav"])
        try:
            wav_info(audio_bytes)
        except WavError as err:
            return f"unusable wav ({err})"
    questions: tuple[tuple[str, str], ...] = ()
    if "qa.json" in sample and "qa" in extras:
        try:
            questions = parse_questions(bytes(sample["qa.json"]))
        except ValueError as err:
            return f"unusable qa.json ({err})"
    return _Candidate(str(sample.get("__key__", "")), image_bytes, caption, audio_bytes, questions)


def parse_questions(data: bytes) -> tuple[tuple[str, str], ...]:
    """``qa.json`` bytes -> (question, answer) pairs; raises ValueError unless it is a JSON list of
    objects with non-empty string ``question`` and ``answer`` (other fields are ignored)."""
    try:
        pairs = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not UTF-8 JSON: {err}") from None
    if not isinstance(pairs, list):
        raise ValueError(f"expected a list of question-answer objects, got {type(pairs).__name__}")
    parsed = []
    for pair in pairs:
        question = pair.get("question") if isinstance(pair, dict) else None
        answer = pair.get("answer") if isinstance(pair, dict) else None
        if not (isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip()):
            raise ValueError(f"{pair!r} is not an object with non-empty 'question' and 'answer' strings")
        parsed.append((" ".join(question.split()), " ".join(answer.split())))
    return tuple(parsed)


def question_choice(seed: int, epoch: int, key: str, count: int) -> int:
    """Which of a sample's ``count`` questions it contributes in pass ``epoch``: a pure function
    of the arguments, the same in every process."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def answer_index(answer: str) -> int:
    """The class of ``answer`` in :data:`~megamm.data.demo.ANSWER_VOCAB` (case and spacing
    ignored), or :data:`NO_ANSWER`."""
    return ANSWER_INDEX.get(" ".join(answer.lower().split()), NO_ANSWER)


def max_audio_samples(cfg: DataConfig) -> int:
    """Samples of ``data.max_audio_seconds`` at :data:`SAMPLE_RATE`: audio is cut to this length."""
    return int(round(cfg.max_audio_seconds * SAMPLE_RATE))


def padded_audio_length(longest: int) -> int:
    """The padded length S of a batch whose longest clip has ``longest`` samples."""
    return max(1, -(-longest // AUDIO_PAD_MULTIPLE)) * AUDIO_PAD_MULTIPLE


def _describe(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')!r}"


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Image bytes -> (image_size, image_size, 3) uint8 RGB.

    Non-square images are centre-cropped to a square first; other sizes are resized (bicubic).
    Raises whatever PIL raises for corrupt data.
    """
    with Image.open(io.BytesIO(data)) as image:
        return square_rgb(image, image_size)


def square_rgb(image: Image.Image, image_size: int) -> np.ndarray:
    """A PIL image -> (image_size, image_size, 3) uint8 RGB, as the loaders make it: converted to
    RGB, centre-cropped to a square, resized (bicubic) if its size differs."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side))
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    pixels = torch.from_numpy(images).to(torch.float32)  # (B, H, W, 3)
    return pixels.permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1.0)


class _BatchBuilder:
    """Decodes candidates and collates them into :class:`Batch` dicts."""

    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig, log: _SkipLog) -> None:
        self.tokenizer = tokenizer
        self.image_size = cfg.image_size
        self.max_length = cfg.max_text_length
        self.max_audio_samples = max_audio_samples(cfg)
        self.seed = cfg.seed
        self.log = log
        self._reset()

    def _reset(self) -> None:
        self._images: list[np.ndarray] = []
        self._captions: list[str] = []
        self._keys: list[str] = []
        self._audio: list[np.ndarray | None] = []
        self._questions: list[tuple[str, str] | None] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, candidate: _Candidate, epoch: int = 0) -> bool:
        """Decode and append, with the question of pass ``epoch``; False (and counted as skipped)
        if the image or the audio does not decode."""
        try:
            pixels = decode_image(candidate.image_bytes, self.image_size)
        except Exception as err:  # PIL raises many types on corrupt pixel data
            self.log.add(f"{candidate.key!r}: image data does not decode ({type(err).__name__}: {err})")
            return False
        audio = None
        if candidate.audio_bytes is not None:
            try:
                audio = decode_wav(candidate.audio_bytes)[: self.max_audio_samples]
            except WavError as err:
                self.log.add(f"{candidate.key!r}: wav does not decode ({err})")
                return False
        question = None
        if candidate.questions:
            index = question_choice(self.seed, epoch, candidate.key, len(candidate.questions))
            question = candidate.questions[index]
        self._images.append(pixels)
        self._captions.append(candidate.caption)
        self._keys.append(candidate.key)
        self._audio.append(audio)
        self._questions.append(question)
        return True

    def _encode_optional(self, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask of ``texts``; a None row is all padding, masked out."""
        absent = ([self.tokenizer.pad_id] * self.max_length, [False] * self.max_length)
        encoded = [absent if text is None else self.tokenizer.encode(text, self.max_length) for text in texts]
        ids = torch.tensor([ids for ids, _ in encoded], dtype=torch.int64)  # (B, T)
        return ids, torch.tensor([mask for _, mask in encoded], dtype=torch.bool)  # (B, T)

    def _audio_fields(self) -> dict[str, torch.Tensor]:
        lengths = [0 if clip is None else len(clip) for clip in self._audio]
        waveforms = np.zeros((len(lengths), padded_audio_length(max(lengths))), dtype=np.float32)  # (B, S)
        for row, clip in enumerate(self._audio):
            if clip is not None:
                waveforms[row, : len(clip)] = pcm_to_float(clip)
        return {
            "audio": torch.from_numpy(waveforms),  # (B, S)
            "audio_lengths": torch.tensor(lengths, dtype=torch.int64),  # (B,)
            "has_audio": torch.tensor([clip is not None for clip in self._audio], dtype=torch.bool),  # (B,)
        }

    def _question_fields(self) -> dict[str, torch.Tensor]:
        questions = [None if qa is None else qa[0] for qa in self._questions]
        answer_texts = [None if qa is None else qa[1] for qa in self._questions]
        question_ids, question_mask = self._encode_optional(questions)
        answer_ids, answer_mask = self._encode_optional(answer_texts)
        answers = [NO_ANSWER if qa is None else answer_index(qa[1]) for qa in self._questions]
        return {
            "question_ids": question_ids,  # (B, T)
            "question_mask": question_mask,  # (B, T)
            "answer": torch.tensor(answers, dtype=torch.int64),  # (B,)
            "answer_ids": answer_ids,  # (B, T)
            "answer_mask": answer_mask,  # (B, T)
        }

    def emit(self, stream: int = -1, position: int = 0, epoch: int = 0) -> Batch:
        """The batch of everything added since the last emit, made by ``stream`` at ``position``
        in its pass ``epoch``."""
        encoded = [self.tokenizer.encode(c, self.max_length) for c in self._captions]
        batch: Batch = {
            "image": images_to_tensor(np.stack(self._images)),  # (B, 3, H, W)
            "text_ids": torch.tensor([ids for ids, _ in encoded], dtype=torch.int64),  # (B, T)
            "text_mask": torch.tensor([mask for _, mask in encoded], dtype=torch.bool),  # (B, T)
            **self._audio_fields(),  # type: ignore[typeddict-item]
            **self._question_fields(),  # type: ignore[typeddict-item]
            "keys": self._keys,
            "skipped": self.log.take(),
            "stream": stream,
            "position": position,
            "epoch": epoch,
        }
        self._reset()
        return batch


# ----------------------------------------------------------------------------------------------
# Training streams


def _epoch_rng(seed: int, epoch: int, stream: int) -> random.Random:
    """The RNG of one stream in one epoch, a pure function of its arguments."""
    state = np.random.SeedSequence([seed % 2**64, epoch, stream]).generate_state(1, np.uint64)
    return random.Random(int(state[0]))


def _shuffle(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle through a buffer of ``buffer_size`` items (<= 1: unchanged order)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def _candidates(
    shards: list[str], seed: int, stream: int, shuffle_buffer: int, log: _SkipLog, extras: frozenset[str]
) -> Iterator[tuple[int, _Candidate]]:
    """(epoch, candidate) forever: per epoch, shuffled shard order, buffer-shuffled samples."""
    for epoch in itertools.count():
        rng = _epoch_rng(seed, epoch, stream)
        order = list(shards)
        rng.shuffle(order)
        usable = 0
        for sample in _shuffle(iter_tar_samples(order, log.handler), shuffle_buffer, rng):
            candidate = _screen(sample, extras)
            if isinstance(candidate, str):
                log.add(f"{_describe(sample)}: {candidate}")
                continue
            usable += 1
            yield epoch, candidate
        if usable == 0:
            raise RuntimeError(
                f"{log.where}: shards {order} hold no usable samples (each needs a non-empty 'txt' "
                "and a readable png/jpg); check data.train_shards"
            )


def _train_batches(
    candidates: Iterator[tuple[int, _Candidate]], builder: _BatchBuilder, batch_size: int, stream: int, skip: int
) -> Iterator[Batch]:
    """Micro-batches of ``batch_size`` from ``stream``, after dropping its first ``skip`` candidates undecoded."""
    next(itertools.islice(candidates, skip, skip), None)
    builder.log.take()  # bad samples among the skipped candidates belong to earlier batches
    consumed = skip
    # The epoch that last decoded an image. A resumed stream starts inside an epoch whose earlier
    # part it did not see, so that epoch counts as good; a fresh one starts before epoch 0.
    last_good_epoch: int | None = None if skip else -1
    for epoch, candidate in candidates:
        consumed += 1
        if last_good_epoch is None:
            last_good_epoch = epoch
        if builder.add(candidate, epoch):
            last_good_epoch = epoch
        elif epoch - last_good_epoch > 1:
            raise RuntimeError(f"{builder.log.where}: no image decoded for a whole epoch; check the shards")
        if len(builder) == batch_size:
            yield builder.emit(stream, consumed, epoch)


class _TrainStreams(IterableDataset):
    """The training streams of one data-parallel rank; each DataLoader worker runs one."""

    def __init__(
        self,
        cfg: DataConfig,
        shards: list[str],
        tokenizer: Tokenizer,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        start: DataPosition,
        extras: frozenset[str],
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.extras = extras
        self.shards = shards
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.start = start
        self.num_workers = max(cfg.num_workers, 1)

    def _worker_index(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(
                f"loader built for {self.num_workers} workers runs with {info.num_workers}; "
                "create it with build_train_loader"
            )
        return int(info.id)

    def __iter__(self) -> Iterator[Batch]:
        workers = self.num_workers
        # DataLoader worker 0 serves the first batch requested, which is global batch
        # start.batches; the stream that owns it is logical worker start.batches % W.
        logical = (self._worker_index() + self.start.batches) % workers
        stream = self.dp_rank * workers + logical
        log = _SkipLog(f"data stream {stream} (dp rank {self.dp_rank}, worker {logical})")
        shards = self.shards[stream :: self.dp_size * workers]
        candidates = _candidates(shards, self.cfg.seed, stream, self.cfg.shuffle_buffer, log, self.extras)
        builder = _BatchBuilder(self.tokenizer, self.cfg, log)
        skip = self.start.streams.get(stream, 0)
        return _train_batches(candidates, builder, self.micro_batch_size, stream, skip)


WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Preemption signals (``megamm.engine.preemption.STOP_SIGNALS``): a scheduler sends them to every
process of a job, and a DataLoader worker that died of one would take its rank down before the
rank could checkpoint. The rank stops its workers itself."""


def _ignore_scheduler_signals(_worker_id: int) -> None:
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _check_loader_args(dp_rank: int, dp_size: int, micro_batch_size: int, start: DataPosition) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
    if start.batches < 0 or any(count < 0 for count in start.streams.values()):
        raise ValueError(f"a data position counts up from 0, got {start}")


def check_shard_count(shards: list[str], cfg: DataConfig, dp_size: int) -> None:
    """Refuse fewer training shards than streams (``dp_size`` ranks x loader workers; one rank's
    workers under ``data.global_batches``)."""
    workers = max(cfg.num_workers, 1)
    dp_size = 1 if cfg.global_batches else dp_size
    if len(shards) < dp_size * workers:
        raise ConfigError(
            f"data.train_shards={cfg.train_shards!r} has {len(shards)} shards, but {dp_size} data-parallel "
            f"ranks x {workers} loader workers (data.num_workers={cfg.num_workers}) need at least "
            f"{dp_size * workers}; write more, smaller shards or lower data.num_workers"
        )


def build_train_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    start: DataPosition | None = None,
    extras: Iterable[str] = EXTRAS,
) -> Iterable[Batch]:
    """An endless, deterministic stream of training micro-batches for one data-parallel rank.

    Args:
        cfg: the ``data`` config (shards, workers, shuffle buffer, seed, sizes).
        tokenizer: encodes captions to ``cfg.max_text_length`` ids.
        dp_rank, dp_size: this rank's data-parallel index and the data-parallel world size
            (not the global rank: tensor-parallel peers pass the same ``dp_rank``).
        micro_batch_size: samples per batch.
        start: where this rank's data stands (a resumed run's saved position; None: the start).
            It may come from a run with another ``micro_batch_size``: positions count samples.
        extras: which of :data:`EXTRAS` to read (others are neither screened nor decoded). The
            position depends on it (a bad ``wav`` is a bad sample only when audio is read): a
            resumed run must ask for the same.

    Returns:
        A DataLoader; each ``iter()`` starts again at ``start``. Same arguments, same batches.

    Raises:
        ConfigError: the shards are missing, or fewer than ``dp_size * max(num_workers, 1)``.
    """
    cfg.validate("data")
    start = start or DataPosition()
    _check_loader_args(dp_rank, dp_size, micro_batch_size, start)
    chosen = _check_extras(extras)
    shards = expand_shards(cfg.train_shards, "data.train_shards")
    check_shard_count(shards, cfg, dp_size)
    if cfg.global_batches:
        dataset = _TrainStreams(cfg, shards, tokenizer, 0, 1, micro_batch_size * dp_size, start, chosen)
    else:
        dataset = _TrainStreams(cfg, shards, tokenizer, dp_rank, dp_size, micro_batch_size, start, chosen)
    init = _ignore_scheduler_signals if cfg.num_workers > 0 else None
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, worker_init_fn=init)
    return _RowsOf(loader, dp_rank, micro_batch_size) if cfg.global_batches else loader


class _RowsOf:
    """Data-parallel rank ``dp_rank``'s rows of every global micro-batch (``data.global_batches``).

    The skip count is reported by rank 0 only, so that its sum over ranks counts each bad sample once.
    """

    def __init__(self, loader: DataLoader, dp_rank: int, micro_batch_size: int) -> None:
        self.loader = loader
        self.dp_rank = dp_rank
        self.rows = slice(dp_rank * micro_batch_size, (dp_rank + 1) * micro_batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield {  # type: ignore[misc]
                **batch,
                **{name: batch[name][self.rows] for name in ROW_FIELDS},  # type: ignore[literal-required]
                "keys": batch["keys"][self.rows],
                "skipped": batch["skipped"] if self.dp_rank == 0 else 0,
            }


# ----------------------------------------------------------------------------------------------
# Evaluation


def iter_eval_batches(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    extras: Iterable[str] = EXTRAS,
) -> Iterator[Batch]:
    """This data-parallel rank's share of the evaluation set, streamed: every usable sample of
    its shards (``shards[dp_rank::dp_size]`` of ``cfg.eval_shards``) once, in file order.

    Only one batch is held at a time, so the set may be of any size. Each sample's question is
    that of pass 0 (see the module docstring). The last batch may be smaller; a rank may get no
    shard at all when there are fewer shards than ranks. ``extras``: as for
    :func:`build_train_loader`.

    Raises:
        ConfigError: the shards are missing, or (read whole, ``dp_size == 1``) hold no usable
            sample.
    """
    cfg.validate("data")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    shards = expand_shards(cfg.eval_shards, "data.eval_shards")[dp_rank::dp_size]
    log = _SkipLog("eval data" if dp_size == 1 else f"eval data (dp rank {dp_rank})")
    builder = _BatchBuilder(tokenizer, cfg, log)
    chosen = _check_extras(extras)
    delivered = 0
    for sample in iter_tar_samples(shards, log.handler):
        candidate = _screen(sample, chosen)
        if isinstance(candidate, str):
            log.add(f"{_describe(sample)}: {candidate}")
        elif builder.add(candidate) and len(builder) == batch_size:
            delivered += batch_size
            yield builder.emit()
    if len(builder):
        delivered += len(builder)
        yield builder.emit()
    if delivered == 0 and dp_size == 1:
        raise ConfigError(
            f"data.eval_shards={cfg.eval_shards!r} hold no usable samples ({log.total} skipped); "
            "run tools/make_demo_data.py or fix the path"
        )


def placeholder_batch(cfg: DataConfig) -> Batch:
    """One blank sample of the right shapes, for a rank that must join a collective forward pass
    without data of its own (a black image, a caption of BOS alone, no audio, no question)."""
    ids = torch.zeros(1, cfg.max_text_length, dtype=torch.int64)  # (1, T)
    mask = torch.zeros(1, cfg.max_text_length, dtype=torch.bool)  # (1, T)
    ids[0, 0], mask[0, 0] = BOS_ID, True
    return {
        "image": torch.zeros(1, 3, cfg.image_size, cfg.image_size),  # (1, 3, H, W)
        "text_ids": ids,
        "text_mask": mask,
        "audio": torch.zeros(1, padded_audio_length(0)),  # (1, S)
        "audio_lengths": torch.zeros(1, dtype=torch.int64),  # (1,)
        "has_audio": torch.zeros(1, dtype=torch.bool),  # (1,)
        "question_ids": torch.full((1, cfg.max_text_length), PAD_ID, dtype=torch.int64),  # (1, T)
        "question_mask": torch.zeros(1, cfg.max_text_length, dtype=torch.bool),  # (1, T)
        "answer": torch.full((1,), NO_ANSWER, dtype=torch.int64),  # (1,)
        "answer_ids": torch.full((1, cfg.max_text_length), PAD_ID, dtype=torch.int64),  # (1, T)
        "answer_mask": torch.zeros(1, cfg.max_text_length, dtype=torch.bool),  # (1, T)
        "keys": ["placeholder"],
        "skipped": 0,
        "stream": -1,
        "position": 0,
    }


def data_stream_settings(cfg: DataConfig, shards: list[str]) -> dict[str, Any]:
    """What a training data position depends on: with other values it would name other samples.

    The shard list is recorded by file name (count and SHA-256), so moving the data elsewhere
    keeps a position valid; ``micro_batch_size`` is absent because positions count samples.
    """
    names = "\n".join(os.path.basename(path) for path in shards)
    settings: dict[str, Any] = {
        "shards": len(shards),
        "shard_names_sha256": hashlib.sha256(names.encode("utf-8")).hexdigest(),
        "loader_workers": max(cfg.num_workers, 1),
        "seed": cfg.seed,
        "shuffle_buffer": cfg.shuffle_buffer,
    }
    if cfg.global_batches:  # other streams (recorded only when set, so older positions stay valid)
        settings["global_batches"] = True
    return settings
