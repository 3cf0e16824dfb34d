"""One sample, from its tar members to a decoded row, or the reason it is bad.

A sample's members (see ``tools/make_shards.py``, which writes them):

* an image: ``jpg``, ``jpeg``, ``png`` or ``webp`` (:func:`megamm.data.images.decode_image`);
* audio: ``flac`` or ``wav`` (:func:`megamm.data.audio.decode_audio`), read only by a model with
  an audio encoder;
* a caption: ``txt`` (UTF-8), and/or ``json`` with ``"caption": str`` or ``"captions": [str, ...]``
  (one of several drawn per epoch, see :func:`text_choice`);
* a question: ``json`` with ``"question": str`` and ``"answers": [str, ...]`` (or ``"answer"``;
  the most frequent answer is the target), or the demo's ``qa.json`` (a list of
  ``{"question", "answer"}``, one drawn per epoch); read only by a model that answers questions.

A sample is *usable* when it holds a pair of modalities an objective trains on
(:data:`PAIRS`: image+text, audio+text, image+audio; a question counts as text). A member that is
there but does not decode makes the sample bad even if the rest would be usable: bad data is
counted, not silently thinned out. Each bad sample gets one reason from :data:`BAD_REASONS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from megamm.data.audio import AUDIO_EXTENSIONS, AudioError, decode_audio
from megamm.data.demo import ANSWER_VOCAB
from megamm.data.images import IMAGE_EXTENSIONS, ImageError, decode_image
from megamm.data.shards import ShardError, iter_shard_samples

logger = logging.getLogger(__name__)

PAIRS = ("image_text", "audio_text", "image_audio")
"""Modality pairs a sample may be used for."""
EXTRAS = ("audio", "qa")
"""What a loader reads beside images and captions when asked: audio members, questions."""

BAD_REASONS = {
    "image_corrupt": "the image does not decode (corrupt, truncated or not an image)",
    "audio_undecodable": "the audio does not decode",
    "caption_missing": "no caption (txt or json captions) where one is needed",
    "caption_empty": "the caption is empty",
    "caption_not_utf8": "the caption is not UTF-8",
    "json_invalid": "json / qa.json does not parse or lacks its fields",
    "image_missing": "no image where one is needed",
    "no_usable_pair": "no pair of modalities an objective trains on",
    "duplicate_member": "a member name appears twice in the sample",
    "tar_truncated": "the shard ends inside a member (truncated file or download)",
    "tar_corrupt": "a tar header does not parse",
    "shard_unreadable": "the shard cannot be opened or is not a tar file",
    "pipe_failed": "the shard's pipe: command failed",
}
"""Every reason a sample (or the rest of a shard) is skipped, as counted in TensorBoard."""

ANSWER_INDEX: dict[str, int] = {answer: index for index, answer in enumerate(ANSWER_VOCAB)}
NO_ANSWER = -1
"""``answer`` of a row without a question, or whose answer is not in the vocabulary: ignore it."""


@dataclass
class Row:
    """A usable sample, decoded."""

    key: str
    image: np.ndarray | None
    """(H, W, 3) uint8 RGB, or None."""
    caption: str | None
    audio: np.ndarray | None
    """(S,) float32 mono in [-1, 1], cut to the loader's maximum, or None."""
    question: tuple[str, str] | None
    """(question, answer), or None."""


@dataclass(frozen=True)
class Bad:
    """A sample that is skipped, and why."""

    reason: str
    """One of :data:`BAD_REASONS`."""
    detail: str


def text_choice(seed: int, epoch: int, key: str, count: int) -> int:
    """Which of a sample's ``count`` captions (or questions) it contributes in pass ``epoch``: a
    pure function of the arguments, the same in every process and after any resume."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


def answer_index(answer: str) -> int:
    """The class of ``answer`` in :data:`~megamm.data.demo.ANSWER_VOCAB` (case and spacing
    ignored), or :data:`NO_ANSWER`."""
    return ANSWER_INDEX.get(" ".join(answer.lower().split()), NO_ANSWER)


def _clean(text: str) -> str:
    return " ".join(text.split())


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
        parsed.append((_clean(question), _clean(answer)))
    return tuple(parsed)


@dataclass(frozen=True)
class SampleText:
    """What a sample's text members hold."""

    captions: tuple[str, ...] = ()
    questions: tuple[tuple[str, str], ...] = ()
    """(question, answer) choices."""
    problem: Bad | None = None
    """Why a text member that is there cannot be used."""


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        loaded = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not UTF-8 JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _string_list(value: Any, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"'{name}' must be a string or a list of strings")
    return [_clean(item) for item in items if item.strip()]


def read_text(sample: dict[str, Any], questions: bool = True) -> SampleText:
    """The captions (and with ``questions``, the question-answer choices) of a raw sample."""
    captions: list[str] = []
    choices: list[tuple[str, str]] = []
    if "txt" in sample:
        try:
            caption = bytes(sample["txt"]).decode("utf-8")
        except UnicodeDecodeError:
            return SampleText(problem=Bad("caption_not_utf8", "txt is not UTF-8"))
        if not caption.strip():
            return SampleText(problem=Bad("caption_empty", "txt is empty"))
        captions.append(_clean(caption))
    if "json" in sample:
        try:
            record = _json_object(sample["json"])
            listed = [*_string_list(record.get("captions", []), "captions"), *_string_list(record.get("caption", []), "caption")]
            if ("caption" in record or "captions" in record) and not listed and not captions:
                return SampleText(problem=Bad("caption_empty", "json captions are empty"))
            captions = listed or captions
            if questions and "question" in record:
                question = record["question"]
                answers = _string_list(record.get("answers", record.get("answer", [])), "answers")
                if not isinstance(question, str) or not question.strip() or not answers:
                    raise ValueError("'question' needs a non-empty string and at least one answer")
                top = Counter(answers).most_common(1)[0][0]  # the most frequent answer (first on ties)
                choices.append((_clean(question), top))
        except ValueError as err:
            return SampleText(problem=Bad("json_invalid", f"json: {err}"))
    if questions and "qa.json" in sample:
        try:
            choices.extend(parse_questions(bytes(sample["qa.json"])))
        except ValueError as err:
            return SampleText(problem=Bad("json_invalid", f"qa.json: {err}"))
    return SampleText(tuple(captions), tuple(choices))


def sample_texts(sample: dict[str, Any], questions: bool = True) -> list[str]:
    """Every caption (and question and answer) of a raw sample, for training a tokenizer; [] for
    a sample whose text does not read."""
    text = read_text(sample, questions)
    return [*text.captions, *(part for pair in text.questions for part in pair)]


def iter_captions(urls: Iterable[str], *, include_questions: bool = False) -> Iterator[str]:
    """The captions of every sample of the shards (``txt`` and ``json`` captions; local or
    ``pipe:``), in file order; samples and shards that do not read are skipped and counted in a
    warning.

    With ``include_questions``, each sample's questions and answers follow its captions, so that
    a tokenizer trained on them covers those words too.
    """
    skipped = 0

    def on_error(error: ShardError) -> None:
        nonlocal skipped
        skipped += 1
        logger.warning("skipping the rest of a shard: %s", error)

    for sample in iter_shard_samples(urls, on_error):
        texts = sample_texts(sample, include_questions)
        if not texts:
            skipped += 1
        yield from texts
    if skipped:
        logger.warning("iter_captions: %d samples or shards without a usable caption", skipped)


class SampleDecoder:
    """Raw samples -> :class:`Row` or :class:`Bad`, as training decodes them.

    Args:
        image_size: images are centre-cropped and resized to this square.
        sample_rate, max_audio_samples: audio is resampled to this rate and cut to this length.
        seed: with the pass and the key, picks a sample's caption and question (:func:`text_choice`).
        extras: which of :data:`EXTRAS` to read (others are neither checked nor decoded).
        pairs: which of :data:`PAIRS` make a sample usable (the configured objectives').
    """

    def __init__(
        self,
        image_size: int,
        sample_rate: int,
        max_audio_samples: int,
        seed: int,
        extras: Iterable[str] = EXTRAS,
        pairs: Iterable[str] | None = None,
    ) -> None:
        self.extras = frozenset(extras)
        if not self.extras <= set(EXTRAS):
            raise ValueError(f"extras {sorted(self.extras - set(EXTRAS))} are not among {EXTRAS}")
        self.pairs = frozenset(default_pairs(self.extras) if pairs is None else pairs)
        if not self.pairs <= set(PAIRS) or not self.pairs:
            raise ValueError(f"pairs {sorted(self.pairs)} must be a non-empty subset of {PAIRS}")
        if not {"audio_text", "image_audio"}.isdisjoint(self.pairs) and "audio" not in self.extras:
            raise ValueError("audio pairs need the 'audio' extra")
        self.image_size = image_size
        self.sample_rate = sample_rate
        self.max_audio_samples = max_audio_samples
        self.seed = seed

    def __call__(self, sample: dict[str, Any], epoch: int = 0) -> Row | Bad:
        """Decode ``sample`` with the caption and question of pass ``epoch``."""
        key = str(sample.get("__key__", ""))
        if "__error__" in sample:
            return Bad("duplicate_member", str(sample["__error__"]))
        text = read_text(sample, questions="qa" in self.extras)
        if text.problem is not None:
            return text.problem
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        audio_ext = next((ext for ext in AUDIO_EXTENSIONS if ext in sample), None) if "audio" in self.extras else None
        has_text = bool(text.captions or text.questions)
        usable = {
            "image_text": image_ext is not None and has_text,
            "audio_text": audio_ext is not None and has_text,
            "image_audio": image_ext is not None and audio_ext is not None,
        }
        if not any(usable[pair] for pair in self.pairs):
            return self._missing(image_ext, audio_ext, has_text)
        image = audio = None
        if image_ext is not None:
            try:
                image = decode_image(bytes(sample[image_ext]), self.image_size)
            except ImageError as err:
                return Bad("image_corrupt", f"{image_ext}: {err}")
        if audio_ext is not None:
            try:
                audio = decode_audio(bytes(sample[audio_ext]), audio_ext, self.sample_rate, self.max_audio_samples)
            except AudioError as err:
                return Bad("audio_undecodable", f"{audio_ext}: {err}")
        caption = text.captions[text_choice(self.seed, epoch, key, len(text.captions))] if text.captions else None
        question = text.questions[text_choice(self.seed, epoch, key, len(text.questions))] if text.questions else None
        return Row(key, image, caption, audio, question)

    def _missing(self, image_ext: str | None, audio_ext: str | None, has_text: bool) -> Bad:
        """The reason a sample completes none of the configured pairs."""
        if not has_text and (image_ext is not None or audio_ext is not None) and (
            "image_text" in self.pairs or "audio_text" in self.pairs
        ):
            return Bad("caption_missing", "no txt and no json captions")
        if image_ext is None and (has_text or audio_ext is not None) and "audio_text" not in self.pairs:
            return Bad("image_missing", f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)})")
        held = [name for name, there in (("image", image_ext), ("text", has_text), ("audio", audio_ext)) if there]
        return Bad("no_usable_pair", f"holds {', '.join(held) or 'nothing usable'}; trained pairs: {', '.join(sorted(self.pairs))}")


def default_pairs(extras: Iterable[str]) -> tuple[str, ...]:
    """The pairs of a model that reads ``extras``: image+text, and the audio pairs with audio."""
    return PAIRS if "audio" in set(extras) else ("image_text",)
