"""Training and evaluation loaders over WebDataset image-caption shards.

Training data is read as ``dp_size * W`` independent, deterministic streams
(``W = max(data.num_workers, 1)`` DataLoader workers per data-parallel rank). Stream
``s = dp_rank * W + worker`` owns the shards ``shards[s::dp_size * W]``; per epoch it shuffles
its shard order and then its samples (in a buffer of ``data.shuffle_buffer``), both with RNGs
seeded from ``(data.seed, epoch, s)``, and builds whole micro-batches inside the worker. The
DataLoader hands out batches round-robin over workers, so global batch ``i`` comes from worker
``i % W``. Ranks that share a data-parallel index (tensor-parallel peers) therefore see
identical batches, and resuming at batch ``k`` replays exactly the batches ``k, k+1, ...``.

A sample is usable if it has a non-empty UTF-8 ``txt`` caption and an image (``png``, ``jpg``,
``jpeg`` or ``webp``) whose header can be read. Unusable samples and broken tar members are
skipped and counted in the ``skipped`` field of the next batch. Resuming skips raw samples
before decoding, using that same check, so it is exact and cheap. (The one case it cannot see
is an image whose header is valid but whose pixel data is corrupt: it is skipped when decoded,
and a resume that jumps over it is one sample out of step from there on.)
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megamm.config import ConfigError, DataConfig
from megamm.data.shards import expand_shards, iter_tar_samples
from megamm.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
_MAX_WARNINGS = 5


class Batch(TypedDict):
    """One batch of image-caption pairs."""

    image: torch.Tensor
    """(B, 3, H, W) float32, pixel values mapped to [-1, 1]: (x / 255 - 0.5) / 0.5."""
    text_ids: torch.Tensor
    """(B, T) int64 token ids: BOS, pieces, EOS, then padding."""
    text_mask: torch.Tensor
    """(B, T) bool, True for real tokens (BOS and EOS included)."""
    keys: list[str]
    """Sample keys, one per row."""
    skipped: int
    """Bad samples and broken tar members skipped while producing this batch."""


# ----------------------------------------------------------------------------------------------
# Screening, decoding and collation


@dataclass(frozen=True)
class _Candidate:
    """A raw sample that passed the cheap pre-decode check."""

    key: str
    image_bytes: bytes
    caption: str


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


def _screen(sample: dict[str, Any]) -> _Candidate | str:
    """The sample as a candidate, or the reason it is unusable. Reads only the image header."""
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
    return _Candidate(str(sample.get("__key__", "")), image_bytes, caption)


def _describe(sample: dict[str, Any]) -> str:
    return f"{sample.get('__url__', '?')}: {sample.get('__key__', '?')!r}"


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Image bytes -> (image_size, image_size, 3) uint8 RGB.

    Non-square images are centre-cropped to a square first; other sizes are resized (bicubic).
    Raises whatever PIL raises for corrupt data.
    """
    with Image.open(io.BytesIO(data)) as image:
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
        self.log = log
        self._images: list[np.ndarray] = []
        self._captions: list[str] = []
        self._keys: list[str] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, candidate: _Candidate) -> bool:
        """Decode and append; False (and counted as skipped) if the image does not decode."""
        try:
            pixels = decode_image(candidate.image_bytes, self.image_size)
        except Exception as err:  # PIL raises many types on corrupt pixel data
            self.log.add(f"{candidate.key!r}: image data does not decode ({type(err).__name__}: {err})")
            return False
        self._images.append(pixels)
        self._captions.append(candidate.caption)
        self._keys.append(candidate.key)
        return True

    def emit(self) -> Batch:
        """The batch of everything added since the last emit."""
        encoded = [self.tokenizer.encode(c, self.max_length) for c in self._captions]
        batch: Batch = {
            "image": images_to_tensor(np.stack(self._images)),  # (B, 3, H, W)
            "text_ids": torch.tensor([ids for ids, _ in encoded], dtype=torch.int64),  # (B, T)
            "text_mask": torch.tensor([mask for _, mask in encoded], dtype=torch.bool),  # (B, T)
            "keys": self._keys,
            "skipped": self.log.take(),
        }
        self._images, self._captions, self._keys = [], [], []
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
    shards: list[str], seed: int, stream: int, shuffle_buffer: int, log: _SkipLog
) -> Iterator[tuple[int, _Candidate]]:
    """(epoch, candidate) forever: per epoch, shuffled shard order, buffer-shuffled samples."""
    for epoch in itertools.count():
        rng = _epoch_rng(seed, epoch, stream)
        order = list(shards)
        rng.shuffle(order)
        usable = 0
        for sample in _shuffle(iter_tar_samples(order, log.handler), shuffle_buffer, rng):
            candidate = _screen(sample)
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
    candidates: Iterator[tuple[int, _Candidate]], builder: _BatchBuilder, batch_size: int, skip_batches: int
) -> Iterator[Batch]:
    """Micro-batches of ``batch_size``, after dropping the first ``skip_batches`` undecoded."""
    next(itertools.islice(candidates, skip_batches * batch_size, skip_batches * batch_size), None)
    builder.log.take()  # bad samples inside the skipped batches belong to those batches
    last_good_epoch = -1
    for epoch, candidate in candidates:
        if builder.add(candidate):
            last_good_epoch = epoch
        elif epoch - last_good_epoch > 1:
            raise RuntimeError(f"{builder.log.where}: no image decoded for a whole epoch; check the shards")
        if len(builder) == batch_size:
            yield builder.emit()


def _batches_before(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of the global batches [0, start_batch) worker ``worker`` produces (i % W == worker)."""
    if start_batch <= worker:
        return 0
    return (start_batch - worker + num_workers - 1) // num_workers


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
        start_batch: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.shards = shards
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.start_batch = start_batch
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
        # start_batch; the stream that owns it is logical worker start_batch % W.
        logical = (self._worker_index() + self.start_batch) % workers
        stream = self.dp_rank * workers + logical
        log = _SkipLog(f"data stream {stream} (dp rank {self.dp_rank}, worker {logical})")
        shards = self.shards[stream :: self.dp_size * workers]
        candidates = _candidates(shards, self.cfg.seed, stream, self.cfg.shuffle_buffer, log)
        builder = _BatchBuilder(self.tokenizer, self.cfg, log)
        skip = _batches_before(self.start_batch, logical, workers)
        return _train_batches(candidates, builder, self.micro_batch_size, skip)


def _check_loader_args(dp_rank: int, dp_size: int, micro_batch_size: int, start_batch: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
    if start_batch < 0:
        raise ValueError(f"start_batch={start_batch} must be >= 0")


def check_shard_count(shards: list[str], cfg: DataConfig, dp_size: int) -> None:
    """Refuse fewer training shards than streams (``dp_size`` ranks x loader workers)."""
    workers = max(cfg.num_workers, 1)
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
    start_batch: int = 0,
) -> Iterable[Batch]:
    """An endless, deterministic stream of training micro-batches for one data-parallel rank.

    Args:
        cfg: the ``data`` config (shards, workers, shuffle buffer, seed, sizes).
        tokenizer: encodes captions to ``cfg.max_text_length`` ids.
        dp_rank, dp_size: this rank's data-parallel index and the data-parallel world size
            (not the global rank: tensor-parallel peers pass the same ``dp_rank``).
        micro_batch_size: samples per batch.
        start_batch: batches already consumed; iteration starts with batch ``start_batch``.

    Returns:
        A DataLoader; each ``iter()`` starts again at ``start_batch``. Same arguments, same
        batches.

    Raises:
        ConfigError: the shards are missing, or fewer than ``dp_size * max(num_workers, 1)``.
    """
    cfg.validate("data")
    _check_loader_args(dp_rank, dp_size, micro_batch_size, start_batch)
    shards = expand_shards(cfg.train_shards, "data.train_shards")
    check_shard_count(shards, cfg, dp_size)
    dataset = _TrainStreams(cfg, shards, tokenizer, dp_rank, dp_size, micro_batch_size, start_batch)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)


# ----------------------------------------------------------------------------------------------
# Evaluation


def iter_eval_batches(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int) -> Iterator[Batch]:
    """Every usable sample of ``cfg.eval_shards`` once, in file order, in this process.

    The last batch may be smaller. Raises ConfigError if the shards are missing or hold no
    usable sample.
    """
    cfg.validate("data")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    shards = expand_shards(cfg.eval_shards, "data.eval_shards")
    log = _SkipLog("eval data")
    builder = _BatchBuilder(tokenizer, cfg, log)
    delivered = 0
    for sample in iter_tar_samples(shards, log.handler):
        candidate = _screen(sample)
        if isinstance(candidate, str):
            log.add(f"{_describe(sample)}: {candidate}")
        elif builder.add(candidate) and len(builder) == batch_size:
            delivered += batch_size
            yield builder.emit()
    if len(builder):
        delivered += len(builder)
        yield builder.emit()
    if delivered == 0:
        raise ConfigError(
            f"data.eval_shards={cfg.eval_shards!r} hold no usable samples ({log.total} skipped); "
            "run tools/make_demo_data.py or fix the path"
        )
