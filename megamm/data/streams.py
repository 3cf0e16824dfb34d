"""Training streams: which raw samples each stream reads, in which order, and where it stands.

Training data is read as ``S`` independent, deterministic streams: ``data-parallel size x W``
(``W = max(data.num_workers, 1)`` DataLoader workers a rank). Each stream reads every source
(``data.sources``, or ``data.train_shards`` as the only one) in *epochs*:

* **epochs** (``data.sampling: epochs``): epoch ``e`` of a source shuffles its shards with a
  seed of ``(data.seed, source, e)``, the same in every stream, and deals the shuffled sequence out
  by *sample*: stream ``s`` takes samples ``[N s / S, N (s + 1) / S)`` of the ``N`` in the
  sequence, using the per-shard sample counts of the index (``sizes.json``). Every sample is read
  exactly once per epoch over all streams, whatever the shard sizes, and streams differ by at most
  one sample. Without an index the shuffled shards are dealt out whole (``order[s::S]``), which
  needs at least ``S`` shards.
* **resample** (``data.sampling: resample``): epoch ``e`` of stream ``s`` draws ``ceil(shards / S)``
  shards with replacement, seeded by ``(data.seed, source, e, s)``.

A stream reads ``data.open_shards`` of its epoch's shards (*pieces*: a shard, or the part of one
that it was dealt) at once and interleaves them, drawing from a random open piece for each sample,
so that a batch mixes several shards. Samples are shuffled in *blocks* of ``data.shuffle_buffer``
raw samples: block ``b`` draws its samples (picking the source by ``weight`` and the piece) and
its permutation from an RNG seeded by ``(data.seed, s, b)``. With one source, a block is shuffled
within each epoch's part of it, so a stream passes on all of an epoch before the next one.

The state of a stream (:func:`initial_state` shows its form) is the block it is in, how many of
that block's samples it has passed on, and, for each source, the epoch, the next piece and the open
pieces with the samples read from each, as they were at the block's start. It is a few numbers,
whatever the amount of data read, so resuming costs the same at any point: whole shards before the
open ones are never opened, the open ones skip their read samples by reading tar headers only
(:meth:`~megamm.data.shards.ShardReader.skip`), and the current block (``data.shuffle_buffer``
samples, which any start reads) is read again to pass over the samples already taken. With blocks
smaller than a shard, that is less than one shard's reading.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from megamm.data.shards import ShardError, ShardReader

logger = logging.getLogger(__name__)

SAMPLING_MODES = ("epochs", "resample")


@dataclass(frozen=True)
class Source:
    """One dataset of the mixture."""

    urls: tuple[str, ...]
    """Its shards: local paths or ``pipe:`` commands."""
    weight: float = 1.0
    """Relative share of the samples drawn from it."""
    sizes: tuple[int, ...] | None = None
    """Samples in each shard (from the index), or None when unknown."""
    name: str = ""


@dataclass(frozen=True)
class StreamPlan:
    """How one stream reads its sources."""

    stream: int
    """This stream's number, in [0, streams)."""
    streams: int
    """Streams that share the data: data-parallel ranks x loader workers."""
    seed: int
    mode: str = "epochs"
    """One of :data:`SAMPLING_MODES`."""
    open_shards: int = 4
    """Pieces read at once per source."""
    block_size: int = 1
    """Raw samples shuffled together."""


@dataclass(frozen=True)
class Piece:
    """The samples ``[start, stop)`` of one shard (``stop`` None: to the shard's end)."""

    shard: int
    start: int
    stop: int | None


def _rng(*parts: int) -> random.Random:
    """An RNG that is a pure function of ``parts`` (non-negative integers)."""
    state = np.random.SeedSequence([int(part) % 2**63 for part in parts]).generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


_ORDER, _RESAMPLE, _BLOCK = 1, 2, 3  # RNG domains


def epoch_pieces(source: Source, index: int, epoch: int, stream: int, streams: int, seed: int, mode: str) -> list[Piece]:
    """The pieces stream ``stream`` of ``streams`` reads from ``source`` (number ``index``) in ``epoch``."""
    count = len(source.urls)
    if mode == "resample":
        rng = _rng(seed, _RESAMPLE, index, epoch, stream)
        return [Piece(rng.randrange(count), 0, None) for _ in range(max(1, math.ceil(count / streams)))]
    order = list(range(count))
    _rng(seed, _ORDER, index, epoch).shuffle(order)
    if source.sizes is None:
        return [Piece(shard, 0, None) for shard in order[stream::streams]]
    total = sum(source.sizes)
    low, high = total * stream // streams, total * (stream + 1) // streams
    pieces, offset = [], 0
    for shard in order:
        size = source.sizes[shard]
        first, last = max(low, offset), min(high, offset + size)
        if first < last:
            pieces.append(Piece(shard, first - offset, last - offset))
        offset += size
    return pieces


def _permutation(raws: list[dict[str, Any]], rng: random.Random, by_epoch: bool) -> list[int]:
    """The order a block's samples are passed on in: shuffled; with ``by_epoch``, within each run
    of one epoch, so that a stream passes on every sample of an epoch before the next epoch's."""
    order = list(range(len(raws)))
    if not by_epoch:
        rng.shuffle(order)
        return order
    start = 0
    for end in range(1, len(raws) + 1):
        if end == len(raws) or raws[end]["__epoch__"] != raws[start]["__epoch__"]:
            segment = order[start:end]
            rng.shuffle(segment)
            order[start:end] = segment
            start = end
    return order


def initial_state(sources: int, epochs: Sequence[int] | None = None) -> dict[str, Any]:
    """The state of a stream that has read nothing (each source at ``epochs[i]``, default 0)."""
    starts = list(epochs) if epochs is not None else [0] * sources
    return {"block": 0, "offset": 0, "sources": [{"epoch": e, "next": 0, "open": []} for e in starts]}


class _SourceCursor:
    """One source as one stream reads it: its epochs' pieces, interleaved ``open_limit`` at a time."""

    def __init__(
        self, source: Source, index: int, plan: StreamPlan, state: dict[str, Any], on_error: Callable[[ShardError, int], None]
    ) -> None:
        self.source, self.index, self.plan = source, index, plan
        self.on_error = on_error
        self.epoch = int(state["epoch"])
        self.next_piece = int(state["next"])
        self.open: list[list[int]] = [[int(p), int(c)] for p, c in state["open"]]
        """[piece index, samples read from it] of the open pieces."""
        self.pieces = self._plan()
        self.readers: dict[int, ShardReader] = {}
        self.closed_bytes = 0
        """Bytes read by the readers already closed."""
        self.read_this_epoch = 0 if not self.open and self.next_piece == 0 else None

    def _plan(self) -> list[Piece]:
        plan = self.plan
        return epoch_pieces(self.source, self.index, self.epoch, plan.stream, plan.streams, plan.seed, plan.mode)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next": self.next_piece, "open": copy.deepcopy(self.open)}

    @property
    def bytes_read(self) -> int:
        return self.closed_bytes + sum(reader.bytes_read for reader in self.readers.values())

    def _fill(self) -> None:
        """Open pieces up to the limit, moving to the next epoch when this one is done."""
        while len(self.open) < self.plan.open_shards:
            if self.next_piece < len(self.pieces):
                self.open.append([self.next_piece, 0])
                self.next_piece += 1
            elif self.open:
                return
            else:
                if self.read_this_epoch == 0:
                    urls = sorted({self.source.urls[p.shard] for p in self.pieces})
                    raise RuntimeError(
                        f"data source {self.source.name or self.index}: a whole epoch ({len(urls)} shards, e.g. "
                        f"{urls[:3]}) gave no sample to stream {self.plan.stream}; check the shards (tools/inspect_shards.py)"
                    )
                self.epoch += 1
                self.next_piece = 0
                self.read_this_epoch = 0
                self.pieces = self._plan()

    def _reader(self, piece_index: int, consumed: int) -> ShardReader:
        reader = self.readers.get(piece_index)
        if reader is None:
            piece = self.pieces[piece_index]
            reader = ShardReader(self.source.urls[piece.shard])
            wanted = piece.start + consumed
            if wanted and reader.skip(wanted) < wanted and reader.error is None:
                logger.warning("%s has fewer samples than its index says (%d wanted)", reader.url, wanted)
            self.readers[piece_index] = reader
        return reader

    def _close(self, slot: int) -> None:
        piece_index, consumed = self.open.pop(slot)
        reader = self.readers.pop(piece_index, None)
        if reader is None:
            return
        reader.close()
        self.closed_bytes += reader.bytes_read
        if reader.error is not None:
            piece = self.pieces[piece_index]
            expected = (piece.stop - piece.start - consumed) if piece.stop is not None else 0
            self.on_error(reader.error, max(expected, 1))

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """The next raw sample, from a random open piece."""
        while True:
            self._fill()
            slot = rng.randrange(len(self.open))
            piece_index, consumed = self.open[slot]
            piece = self.pieces[piece_index]
            if piece.stop is not None and piece.start + consumed >= piece.stop:
                self._close(slot)
                continue
            sample = self._reader(piece_index, consumed).next()
            if sample is None:
                self._close(slot)
                continue
            self.open[slot][1] += 1
            if self.read_this_epoch is not None:
                self.read_this_epoch += 1
            sample["__epoch__"] = self.epoch
            sample["__source__"] = self.index
            return sample

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()


@dataclass
class StreamItem:
    """A raw sample of a stream, with the stream's state once it has been taken."""

    sample: dict[str, Any]
    state: dict[str, Any]


def stream_samples(
    sources: Sequence[Source],
    plan: StreamPlan,
    state: dict[str, Any],
    on_error: Callable[[ShardError, int], None],
    bytes_read: list[int] | None = None,
) -> Iterator[StreamItem]:
    """The raw samples of stream ``plan.stream``, forever, from ``state`` on (see the module docstring).

    ``on_error(error, samples)`` hears of each shard that ended early, with an estimate of the
    samples lost (its piece's unread count from the index, else 1). ``bytes_read``, if given, is
    a one-item list kept up to date with the bytes read from shards so far (for tests and
    benchmarks of resuming).
    """
    if plan.mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {plan.mode!r} is not one of {SAMPLING_MODES}")
    block_size = max(plan.block_size, 1)
    weights = [source.weight for source in sources]
    cursors = [
        _SourceCursor(source, index, plan, source_state, on_error)
        for index, (source, source_state) in enumerate(zip(sources, state["sources"]))
    ]
    block, offset = int(state["block"]), int(state["offset"])
    try:
        while True:
            start = [cursor.state() for cursor in cursors]
            rng = _rng(plan.seed, _BLOCK, plan.stream, block, start[0]["epoch"])
            raws = []
            for _ in range(block_size):
                which = 0 if len(cursors) == 1 else rng.choices(range(len(cursors)), weights)[0]
                raws.append(cursors[which].draw(rng))
            order = _permutation(raws, rng, by_epoch=len(cursors) == 1)
            end = [cursor.state() for cursor in cursors]
            for position in range(offset, block_size):
                if bytes_read is not None:
                    bytes_read[0] = sum(cursor.bytes_read for cursor in cursors)
                taken = position + 1
                after = (
                    {"block": block + 1, "offset": 0, "sources": end}
                    if taken == block_size
                    else {"block": block, "offset": taken, "sources": start}
                )
                yield StreamItem(raws[order[position]], after)
                raws[order[position]] = {}  # release the bytes
            block, offset = block + 1, 0
    finally:
        for cursor in cursors:
            cursor.close()
