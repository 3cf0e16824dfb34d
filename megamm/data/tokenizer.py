"""SentencePiece tokenizer: training from captions and fixed-length encoding for the text tower.

Special ids are fixed so that every model trained here agrees on them: pad=0, unk=1, bos=2,
eos=3. An encoded caption is ``[BOS] + pieces + [EOS]``, truncated or right-padded to a fixed
length, with a boolean mask marking the real tokens.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from megamm.config import ConfigError
from megamm.fileio import atomic_output

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

_MODEL_TYPES = ("unigram", "bpe")


def _clean_captions(captions: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Non-empty, single-line captions; counts them into ``counter[0]``."""
    for caption in captions:
        text = " ".join(str(caption).split())
        if text:
            counter[0] += 1
            yield text


def train_tokenizer(
    captions: Iterable[str],
    model_path: str | Path,
    vocab_size: int,
    *,
    model_type: str = "bpe",
) -> Path:
    """Train a SentencePiece model on ``captions`` and write it atomically to ``model_path``.

    ``vocab_size`` is a soft limit (``hard_vocab_limit=False``): a small corpus yields a smaller
    vocabulary instead of failing. Ids 0-3 are pad, unk, bos, eos.

    Args:
        captions: training sentences; blank ones are ignored.
        model_path: output file, must end in ``.model``; its directory is created.
        vocab_size: target vocabulary size (special tokens included), at least 8.
        model_type: ``unigram`` or ``bpe``.

    Returns:
        The path written.
    """
    path = Path(model_path)
    if path.suffix != ".model":
        raise ValueError(f"tokenizer path {str(path)!r} must end in .model")
    if vocab_size < 8:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least 8")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of {', '.join(_MODEL_TYPES)}")
    count = [0]
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_clean_captions(captions, count),
            model_writer=proto,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=1,
            input_sentence_size=2_000_000,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as err:
        if count[0] == 0:
            raise ValueError("no captions to train the tokenizer on; check the shards") from None
        raise RuntimeError(f"SentencePiece training failed: {err}") from err
    with atomic_output(path) as handle:
        handle.write(proto.getvalue())
    return path


class Tokenizer:
    """A SentencePiece model with fixed-length, masked encoding.

    Args:
        path: the ``.model`` file (``data.tokenizer``).
        field_name: config field named in errors.

    Raises:
        ConfigError: the file is missing, is not a SentencePiece model, or lacks pad/bos/eos ids.
    """

    def __init__(self, path: str | Path, field_name: str = "data.tokenizer") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(
                f"{field_name}={str(path)!r} does not exist; train one with "
                f"`python tools/train_tokenizer.py --shards <training shards> --out {path}` "
                "or fix the path"
            )
        self._load(self.path.read_bytes(), field_name)

    def _load(self, proto: bytes, field_name: str = "data.tokenizer") -> None:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as err:
            raise ConfigError(
                f"{field_name}={str(self.path)!r} is not a SentencePiece model ({err}); "
                "retrain it with tools/train_tokenizer.py --force"
            ) from None
        ids = (processor.pad_id(), processor.bos_id(), processor.eos_id())
        if min(ids) < 0:
            raise ConfigError(
                f"{field_name}={str(self.path)!r} has no pad/bos/eos ids (pad, bos, eos = {ids}); "
                "retrain it with tools/train_tokenizer.py --force"
            )
        self._proto = proto
        self._sp = processor

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.path = Path(str(state["path"]))
        self._load(bytes(state["proto"]))  # type: ignore[arg-type]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the model file: the same pieces and ids, wherever the file lives."""
        return hashlib.sha256(self._proto).hexdigest()

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included; ids are in ``[0, vocab_size)``."""
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def pieces(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS or padding."""
        return list(self._sp.encode(text, out_type=int))

    def encode(self, text: str, max_length: int) -> tuple[list[int], list[bool]]:
        """Exactly ``max_length`` ids ``[BOS] + pieces + [EOS]`` and the mask of real tokens.

        Too long: the pieces are cut so that EOS is still the last real token. Too short: padded
        on the right with ``pad_id`` (mask False).
        """
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (room for BOS and EOS)")
        body = self.pieces(text)[: max_length - 2]
        ids = [self.bos_id, *body, self.eos_id]
        real = len(ids)
        padding = max_length - real
        return ids + [self.pad_id] * padding, [True] * real + [False] * padding

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; padding, BOS and EOS are dropped."""
        special = {self.pad_id, self.bos_id, self.eos_id}
        return str(self._sp.decode([int(i) for i in ids if int(i) not in special]))

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"
