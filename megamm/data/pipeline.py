"""Training and evaluation loaders over WebDataset shards of images, captions, audio and questions.

Training data is read as deterministic streams (:mod:`megamm.data.streams`): ``data-parallel size
x W`` of them (``W = max(data.num_workers, 1)`` DataLoader workers a rank). Stream
``s = dp_rank * W + worker`` is read by that worker of that rank, which decodes its samples
(:mod:`megamm.data.samples`) and builds whole micro-batches. The DataLoader hands out batches
round-robin over workers, so global batch ``i`` comes from worker ``i % W``. Ranks that share a
data-parallel index (tensor- and pipeline-parallel peers) therefore see identical batches.

Bad samples (a corrupt image, undecodable audio, a missing, empty or non-UTF-8 caption, broken
JSON) are skipped, and so is the rest of a shard that is truncated, unreadable or whose ``pipe:``
command fails. Each batch counts what was skipped since the previous one, by reason
(:data:`~megamm.data.samples.BAD_REASONS`) and by shard; the training loop logs the counts and
stops once the bad fraction passes ``data.max_bad_fraction``.

The data position (:class:`DataPosition`) is exact: each batch carries its stream's state once
the batch was taken (a few numbers, :mod:`megamm.data.streams`). A resumed run starts each
stream from its saved state, which costs at most one shard's reading however far the run had
got, and starts the round robin at the batch count, so it sees the batches the uninterrupted run
would have seen. The position counts raw samples, so it stays exact across bad samples and
across a change of ``micro_batch_size``.
"""

from __future__ import annotations

import hashlib
import logging
import signal
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, TypedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megamm.config import ConfigError, DataConfig
from megamm.data.audio import SAMPLE_RATE
from megamm.data.images import images_to_tensor
from megamm.data.samples import EXTRAS, NO_ANSWER, Bad, Row, SampleDecoder, answer_index
from megamm.data.shards import ShardError, expand_shards, iter_shard_samples, shard_name, shard_sizes
from megamm.data.streams import Source, StreamPlan, initial_state, stream_samples
from megamm.data.tokenizer import BOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "AUDIO_PAD_MULTIPLE", "MAX_AUDIO_SAMPLES", "ROW_FIELDS", "Batch", "DataPosition", "bad_summary", "build_sources",
    "build_train_loader", "check_shard_count", "data_stream_settings", "iter_eval_batches", "keys_digest",
    "next_epochs", "placeholder_batch", "stream_count",
]  # fmt: skip

_MAX_WARNINGS = 5

MAX_AUDIO_SECONDS = 1.0
"""Audio is cut to ``data.max_audio_seconds``, by default this length."""
MAX_AUDIO_SAMPLES = int(MAX_AUDIO_SECONDS * SAMPLE_RATE)
AUDIO_PAD_MULTIPLE = 1600
"""A batch's audio is padded to its longest clip rounded up to a multiple of this (0.1 s), at least
one multiple: few distinct shapes, never an empty one. :data:`MAX_AUDIO_SAMPLES` is a multiple."""
ROW_FIELDS = (
    "image", "has_image", "text_ids", "text_mask", "has_text", "audio", "audio_lengths", "has_audio",
    "question_ids", "question_mask", "answer", "answer_ids", "answer_mask",
)  # fmt: skip
"""The tensor fields of a :class:`Batch`, one row per sample."""


class Batch(TypedDict):
    """One batch of samples: each row has a pair of modalities, and a question where it has one."""

    image: torch.Tensor
    """(B, 3, H, W) float32, pixel values mapped to [-1, 1]: (x / 255 - 0.5) / 0.5; -1 (black)
    in rows without an image."""
    has_image: torch.Tensor
    """(B,) bool, True for rows with an image."""
    text_ids: torch.Tensor
    """(B, T) int64 token ids: BOS, pieces, EOS, then padding; BOS alone without a caption."""
    text_mask: torch.Tensor
    """(B, T) bool, True for real tokens (BOS and EOS included)."""
    has_text: torch.Tensor
    """(B,) bool, True for rows with a caption."""
    audio: torch.Tensor
    """(B, S) float32 16 kHz mono waveforms in [-1, 1], zero after each row's length; S is the
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
    """Bad samples skipped while producing this batch (the sum of ``bad``)."""
    bad: dict[str, int]
    """Those bad samples by reason (:data:`~megamm.data.samples.BAD_REASONS`)."""
    bad_shards: dict[str, int]
    """Those bad samples by shard (file name, or the ``pipe:`` command's object)."""
    seen: int
    """Raw samples read while producing this batch, good and bad, plus those lost with shards that
    ended early (as ``bad`` counts them)."""
    stream: int
    """The training stream that made this batch (-1 for evaluation batches)."""
    position: dict[str, Any]
    """That stream's state once this batch was taken (:mod:`megamm.data.streams`)."""
    epoch: int
    """The epoch (of its source) of the batch's last sample (0 first)."""


@dataclass
class DataPosition:
    """Where one data-parallel rank's training data stands: what resuming needs to continue exactly."""

    batches: int = 0
    """Micro-batches taken from this rank's loader (all its workers); sets the round-robin phase."""
    streams: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Stream states, by stream id; a stream not listed starts afresh."""
    epochs: list[int] | None = None
    """Where a stream not listed starts: each source at this epoch (None: epoch 0)."""

    def advance(self, batch: Batch) -> None:
        """Record that ``batch`` has been taken."""
        self.batches += 1
        self.streams[int(batch["stream"])] = batch["position"]


def next_epochs(streams: dict[Any, dict[str, Any]], sources: int) -> list[int]:
    """The epoch after the furthest any saved stream had got, for each source: where to restart
    when the saved stream states cannot be continued (another number of streams)."""
    epochs = [0] * sources
    for state in streams.values():
        for index, source in enumerate(state.get("sources", [])[:sources]):
            epochs[index] = max(epochs[index], int(source["epoch"]) + 1)
    return epochs


# ----------------------------------------------------------------------------------------------
# Bad data and collation


class _BadLog:
    """Counts bad samples since the last batch (by reason and shard) and logs the first few."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.reasons: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()
        self.lost = 0
        """Samples of shards that ended early, since the last batch (counted as read and bad)."""
        self.total = 0

    def add(self, reason: str, url: str, detail: str, count: int = 1) -> None:
        self.reasons[reason] += count
        self.shards[shard_name(url)] += count
        self.total += 1
        if self.total <= _MAX_WARNINGS:
            suffix = "; further bad data is counted silently" if self.total == _MAX_WARNINGS else ""
            logger.warning("%s: skipping bad data (%s): %s%s", self.where, reason, detail, suffix)

    def shard_error(self, error: ShardError, samples: int = 1) -> None:
        """A shard that ended early; ``samples``: those it lost (its index's count, else 1)."""
        self.add(error.reason, error.args[0].split(": ", 1)[0], f"{error} (rest of the shard skipped)", samples)
        self.lost += samples

    def take(self) -> tuple[dict[str, int], dict[str, int], int]:
        """(by reason, by shard, samples lost with shards) since the last call."""
        taken = dict(self.reasons), dict(self.shards), self.lost
        self.reasons.clear()
        self.shards.clear()
        self.lost = 0
        return taken


def max_audio_samples(cfg: DataConfig) -> int:
    """Samples of ``data.max_audio_seconds`` at :data:`SAMPLE_RATE`: audio is cut to this length."""
    return int(round(cfg.max_audio_seconds * SAMPLE_RATE))


def padded_audio_length(longest: int) -> int:
    """The padded length S of a batch whose longest clip has ``longest`` samples."""
    return max(1, -(-longest // AUDIO_PAD_MULTIPLE)) * AUDIO_PAD_MULTIPLE


def make_decoder(cfg: DataConfig, extras: Iterable[str], pairs: Iterable[str] | None) -> SampleDecoder:
    """The sample decoder of the loaders: ``cfg``'s sizes and seed."""
    return SampleDecoder(cfg.image_size, SAMPLE_RATE, max_audio_samples(cfg), cfg.seed, extras, pairs)


class _Collator:
    """Rows -> :class:`Batch`."""

    def __init__(self, tokenizer: Tokenizer, cfg: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.image_size = cfg.image_size
        self.max_length = cfg.max_text_length

    def _encode(self, texts: Sequence[str | None], absent_bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids and mask of ``texts``; a None row is padding (after a lone BOS if ``absent_bos``)."""
        length = self.max_length
        absent = ([BOS_ID] + [PAD_ID] * (length - 1), [True] + [False] * (length - 1)) if absent_bos else (
            [PAD_ID] * length, [False] * length
        )
        encoded = [absent if text is None else self.tokenizer.encode(text, length) for text in texts]
        ids = torch.tensor([ids for ids, _ in encoded], dtype=torch.int64)  # (B, T)
        return ids, torch.tensor([mask for _, mask in encoded], dtype=torch.bool)  # (B, T)

    def __call__(self, rows: Sequence[Row]) -> dict[str, Any]:
        blank = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        images = np.stack([blank if row.image is None else row.image for row in rows])  # (B, H, W, 3)
        text_ids, text_mask = self._encode([row.caption for row in rows], absent_bos=True)
        lengths = [0 if row.audio is None else len(row.audio) for row in rows]
        waveforms = np.zeros((len(rows), padded_audio_length(max(lengths))), dtype=np.float32)  # (B, S)
        for index, row in enumerate(rows):
            if row.audio is not None:
                waveforms[index, : len(row.audio)] = row.audio
        questions = [None if row.question is None else row.question[0] for row in rows]
        answers = [None if row.question is None else row.question[1] for row in rows]
        question_ids, question_mask = self._encode(questions, absent_bos=False)
        answer_ids, answer_mask = self._encode(answers, absent_bos=False)
        return {
            "image": images_to_tensor(images),  # (B, 3, H, W); a missing image is black (-1), as the model's placeholder
            "has_image": torch.tensor([row.image is not None for row in rows], dtype=torch.bool),  # (B,)
            "text_ids": text_ids,  # (B, T)
            "text_mask": text_mask,  # (B, T)
            "has_text": torch.tensor([row.caption is not None for row in rows], dtype=torch.bool),  # (B,)
            "audio": torch.from_numpy(waveforms),  # (B, S)
            "audio_lengths": torch.tensor(lengths, dtype=torch.int64),  # (B,)
            "has_audio": torch.tensor([row.audio is not None for row in rows], dtype=torch.bool),  # (B,)
            "question_ids": question_ids,  # (B, T)
            "question_mask": question_mask,  # (B, T)
            "answer": torch.tensor([NO_ANSWER if a is None else answer_index(a) for a in answers], dtype=torch.int64),
            "answer_ids": answer_ids,  # (B, T)
            "answer_mask": answer_mask,  # (B, T)
            "keys": [row.key for row in rows],
        }


def _batch(collate: _Collator, rows: list[Row], log: _BadLog, seen: int, stream: int, position: dict[str, Any], epoch: int) -> Batch:
    bad, bad_shards, lost = log.take()
    return {  # type: ignore[typeddict-item]
        **collate(rows),
        "skipped": sum(bad.values()),
        "bad": bad,
        "bad_shards": bad_shards,
        "seen": seen + lost,
        "stream": stream,
        "position": position,
        "epoch": epoch,
    }


# ----------------------------------------------------------------------------------------------
# Training


def build_sources(cfg: DataConfig) -> list[Source]:
    """The training sources: ``data.sources``, or ``data.train_shards`` as the only one.

    Raises:
        ConfigError: a source's shards are missing.
    """
    if not cfg.sources:
        urls = expand_shards(cfg.train_shards, "data.train_shards")
        sizes = shard_sizes(urls)
        return [Source(tuple(urls), 1.0, None if sizes is None else tuple(sizes), "train_shards")]
    sources = []
    for index, spec in enumerate(cfg.sources):
        field_name = f"data.sources[{index}].shards"
        urls = expand_shards(spec.shards, field_name)
        sizes = shard_sizes(urls, spec.index or None)
        if spec.index and sizes is None:
            raise ConfigError(
                f"data.sources[{index}].index={spec.index!r} does not list every shard of {field_name} (by file name); "
                "rewrite it (tools/make_shards.py writes one) or leave it empty"
            )
        sources.append(Source(tuple(urls), spec.weight, None if sizes is None else tuple(sizes), spec.name or f"source{index}"))
    return sources


def stream_count(cfg: DataConfig, dp_size: int) -> int:
    """Training streams: data-parallel ranks x loader workers (one rank's workers under
    ``data.global_batches``)."""
    return (1 if cfg.global_batches else dp_size) * max(cfg.num_workers, 1)


def check_shard_count(sources: Sequence[Source], cfg: DataConfig, dp_size: int) -> None:
    """Refuse data that cannot feed every stream: in epochs mode, fewer shards than streams when
    no index gives the sample counts (with one, streams share shards), or fewer samples than streams.

    Raises:
        ConfigError: naming the source, the counts and the fixes.
    """
    streams = stream_count(cfg, dp_size)
    workers = max(cfg.num_workers, 1)
    for index, source in enumerate(sources):
        name = "data.train_shards" if not cfg.sources else f"data.sources[{index}]"
        if cfg.sampling != "epochs":
            continue
        if source.sizes is None and len(source.urls) < streams:
            raise ConfigError(
                f"{name} has {len(source.urls)} shards and no sample-count index, but {streams // workers} data-parallel "
                f"ranks x {workers} loader workers (data.num_workers={cfg.num_workers}) need at least {streams} shards "
                "to deal them out whole; write an index (tools/make_shards.py writes sizes.json beside the shards; "
                "with it streams share shards by sample), write more, smaller shards, lower data.num_workers, or use "
                "data.sampling=resample"
            )
        if source.sizes is not None and sum(source.sizes) < streams:
            raise ConfigError(
                f"{name} holds {sum(source.sizes)} samples, fewer than the {streams} streams that read it "
                f"(data-parallel ranks x data.num_workers={cfg.num_workers}); use more data or fewer workers"
            )


class _TrainStreams(IterableDataset):
    """The training streams of one data-parallel rank; each DataLoader worker runs one."""

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[Source],
        tokenizer: Tokenizer,
        dp_rank: int,
        dp_size: int,
        micro_batch_size: int,
        start: DataPosition,
        decoder: SampleDecoder,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.sources = sources
        self.tokenizer = tokenizer
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.start = start
        self.decoder = decoder
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
        state = self.start.streams.get(stream) or initial_state(len(self.sources), self.start.epochs)
        return self.batches(stream, state)

    def batches(self, stream: int, state: dict[str, Any], bytes_read: list[int] | None = None) -> Iterator[Batch]:
        """Micro-batches of ``stream`` from ``state`` on."""
        cfg = self.cfg
        log = _BadLog(f"data stream {stream} (dp rank {self.dp_rank})")
        collate = _Collator(self.tokenizer, cfg)
        plan = StreamPlan(stream, self.dp_size * self.num_workers, cfg.seed, cfg.sampling, cfg.open_shards, cfg.shuffle_buffer)
        items = stream_samples(self.sources, plan, state, log.shard_error, bytes_read)
        rows: list[Row] = []
        seen = 0
        # The epoch of the last usable sample: a stream that reads a whole epoch without one would
        # never make a batch, and its peers would wait for it. A fresh stream starts before its first
        # epoch; a resumed one inside an epoch whose earlier part it did not read, which counts as good.
        fresh = state["block"] == 0 and state["offset"] == 0
        last_good: int | None = None
        for item in items:
            seen += 1
            epoch = item.sample["__epoch__"]
            if last_good is None:
                last_good = epoch - 1 if fresh else epoch
            decoded = self.decoder(item.sample, epoch)
            if isinstance(decoded, Bad):
                log.add(decoded.reason, item.sample["__url__"], f"{shard_name(item.sample['__url__'])}: {item.sample['__key__']!r}: {decoded.detail}")
                if epoch - last_good > 1:
                    raise RuntimeError(
                        f"{log.where}: its shards hold no usable samples (a whole epoch read; bad: "
                        f"{dict(log.reasons)}); check data.train_shards / data.sources with tools/inspect_shards.py"
                    )
                continue
            last_good = epoch
            rows.append(decoded)
            if len(rows) == self.micro_batch_size:
                yield _batch(collate, rows, log, seen, stream, item.state, int(item.sample["__epoch__"]))
                rows, seen = [], 0


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
    if start.batches < 0:
        raise ValueError(f"a data position counts up from 0, got {start}")
    for stream, state in start.streams.items():
        if not isinstance(state, dict) or not {"block", "offset", "sources"} <= state.keys():
            raise ValueError(
                f"the data position of stream {stream} is {state!r}, not a stream state (an older megamm saved it); "
                "resume with --restart-data"
            )


def build_train_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    start: DataPosition | None = None,
    extras: Iterable[str] = EXTRAS,
    pairs: Iterable[str] | None = None,
) -> Iterable[Batch]:
    """An endless, deterministic stream of training micro-batches for one data-parallel rank.

    Args:
        cfg: the ``data`` config (sources, workers, sampling, shuffle blocks, seed, sizes).
        tokenizer: encodes captions to ``cfg.max_text_length`` ids.
        dp_rank, dp_size: this rank's data-parallel index and the data-parallel world size
            (not the global rank: tensor-parallel peers pass the same ``dp_rank``).
        micro_batch_size: samples per batch.
        start: where this rank's data stands (a resumed run's saved position; None: the start).
            It may come from a run with another ``micro_batch_size``: positions count samples.
        extras: which of :data:`EXTRAS` to read (others are neither checked nor decoded).
        pairs: which modality pairs make a sample usable (``megamm.data.PAIRS``; None: image+text, and
            the audio pairs when audio is read). A resumed run must ask for the same extras and
            pairs: they decide which samples are bad.

    Returns:
        A DataLoader; each ``iter()`` starts again at ``start``. Same arguments, same batches.

    Raises:
        ConfigError: the shards are missing, or cannot feed ``dp_size * max(num_workers, 1)`` streams.
    """
    cfg.validate("data")
    start = start or DataPosition()
    _check_loader_args(dp_rank, dp_size, micro_batch_size, start)
    decoder = make_decoder(cfg, extras, pairs)
    sources = build_sources(cfg)
    check_shard_count(sources, cfg, dp_size)
    if cfg.global_batches:
        dataset = _TrainStreams(cfg, sources, tokenizer, 0, 1, micro_batch_size * dp_size, start, decoder)
    else:
        dataset = _TrainStreams(cfg, sources, tokenizer, dp_rank, dp_size, micro_batch_size, start, decoder)
    init = _ignore_scheduler_signals if cfg.num_workers > 0 else None
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, worker_init_fn=init)
    return _RowsOf(loader, dp_rank, micro_batch_size) if cfg.global_batches else loader


class _RowsOf:
    """Data-parallel rank ``dp_rank``'s rows of every global micro-batch (``data.global_batches``).

    The bad-data counts are reported by rank 0 only, so that their sum over ranks counts each once.
    """

    def __init__(self, loader: DataLoader, dp_rank: int, micro_batch_size: int) -> None:
        self.loader = loader
        self.dp_rank = dp_rank
        self.rows = slice(dp_rank * micro_batch_size, (dp_rank + 1) * micro_batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            mine = self.dp_rank == 0
            yield {  # type: ignore[misc]
                **batch,
                **{name: batch[name][self.rows] for name in ROW_FIELDS},  # type: ignore[literal-required]
                "keys": batch["keys"][self.rows],
                "skipped": batch["skipped"] if mine else 0,
                "bad": batch["bad"] if mine else {},
                "bad_shards": batch["bad_shards"] if mine else {},
                "seen": batch["seen"] if mine else 0,
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
    pairs: Iterable[str] | None = None,
) -> Iterator[Batch]:
    """This data-parallel rank's share of the evaluation set, streamed: every usable sample of
    its shards (``shards[dp_rank::dp_size]`` of ``cfg.eval_shards``) once, in file order.

    Only one batch is held at a time, so the set may be of any size. Each sample's caption and
    question are those of pass 0. The last batch may be smaller; a rank may get no shard at all
    when there are fewer shards than ranks. ``extras``, ``pairs``: as for :func:`build_train_loader`.

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
    log = _BadLog("eval data" if dp_size == 1 else f"eval data (dp rank {dp_rank})")
    decoder = make_decoder(cfg, extras, pairs)
    collate = _Collator(tokenizer, cfg)
    rows: list[Row] = []
    delivered = seen = 0
    for sample in iter_shard_samples(shards, log.shard_error):
        seen += 1
        decoded = decoder(sample)
        if isinstance(decoded, Bad):
            log.add(decoded.reason, sample["__url__"], f"{shard_name(sample['__url__'])}: {sample['__key__']!r}: {decoded.detail}")
            continue
        rows.append(decoded)
        if len(rows) == batch_size:
            delivered += batch_size
            yield _batch(collate, rows, log, seen, -1, {}, 0)
            rows, seen = [], 0
    if rows:
        delivered += len(rows)
        yield _batch(collate, rows, log, seen, -1, {}, 0)
    if delivered == 0 and dp_size == 1:
        raise ConfigError(
            f"data.eval_shards={cfg.eval_shards!r} hold no usable samples ({log.total} bad: "
            "tools/inspect_shards.py tells why); run tools/make_demo_data.py or fix the path"
        )


def placeholder_batch(cfg: DataConfig) -> Batch:
    """One blank sample of the right shapes, for a rank that must join a collective forward pass
    without data of its own (a black image, a caption of BOS alone, no audio, no question)."""
    ids = torch.zeros(1, cfg.max_text_length, dtype=torch.int64)  # (1, T)
    mask = torch.zeros(1, cfg.max_text_length, dtype=torch.bool)  # (1, T)
    ids[0, 0], mask[0, 0] = BOS_ID, True
    return {
        "image": torch.full((1, 3, cfg.image_size, cfg.image_size), -1.0),  # (1, 3, H, W)
        "has_image": torch.zeros(1, dtype=torch.bool),  # (1,)
        "text_ids": ids,
        "text_mask": mask,
        "has_text": torch.zeros(1, dtype=torch.bool),  # (1,)
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
        "bad": {},
        "bad_shards": {},
        "seen": 0,
        "stream": -1,
        "position": {},
        "epoch": 0,
    }


def data_stream_settings(cfg: DataConfig, sources: Sequence[Source], dp_size: int) -> dict[str, Any]:
    """What a training data position depends on: with other values it would name other samples.

    Shard lists are recorded by file name (count and SHA-256), so moving the data elsewhere
    keeps a position valid; ``micro_batch_size`` is absent because positions count samples.
    ``streams`` may change: a resumed run then restarts at the next epoch (see :func:`next_epochs`).
    """
    recorded = []
    for source in sources:
        names = "\n".join(shard_name(url) for url in source.urls)
        recorded.append({
            "shards": len(source.urls),
            "shard_names_sha256": hashlib.sha256(names.encode("utf-8")).hexdigest(),
            "weight": source.weight,
            "indexed": source.sizes is not None,
        })  # fmt: skip
    return {
        "format": 2,
        "sources": recorded,
        "streams": stream_count(cfg, dp_size),
        "seed": cfg.seed,
        "sampling": cfg.sampling,
        "shuffle_buffer": cfg.shuffle_buffer,
        "open_shards": cfg.open_shards,
        "global_batches": cfg.global_batches,
    }


def keys_digest(keys: Sequence[str]) -> int:
    """A 63-bit digest of a batch's sample keys, to compare across ranks that must read the same."""
    digest = hashlib.blake2b("\0".join(keys).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def bad_summary(shards: dict[str, int], top: int = 5) -> str:
    """``"a.tar (12), b.tar (3)"``: the shards with the most bad samples."""
    worst = sorted(shards.items(), key=lambda item: (-item[1], item[0]))[:top]
    return ", ".join(f"{name} ({count})" for name, count in worst)
