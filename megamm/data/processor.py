"""The processor: raw strings, images and waveforms -> the tensors the model takes, made exactly
as the training loader makes them (:mod:`megamm.data.pipeline`).

- text and questions: ``Tokenizer.encode`` to ``max_length`` ids, ``[BOS] + pieces + [EOS]`` then
  padding, with the mask of real tokens;
- images: RGB, centre-cropped to a square, resized (bicubic) to ``image_size``, mapped to
  [-1, 1] (:func:`~megamm.data.images.decode_image`, :func:`~megamm.data.images.images_to_tensor`);
- audio: 16 kHz mono, int16 PCM (divided by 32768) or float in [-1, 1], cut to
  ``max_audio_samples``, zero-padded to the longest clip rounded up to a multiple of
  :data:`~megamm.data.pipeline.AUDIO_PAD_MULTIPLE`, with each clip's length.

A processor is saved to and loaded from a directory (its tokenizer's ``.model`` file and
``processor.json``), as a pretrained model directory holds it. It knows nothing about the model:
the sizes are plain arguments (:meth:`Processor.for_model` reads them off a ``ModelConfig``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from megamm.config import ConfigError, ModelConfig
from megamm.data.audio import SAMPLE_RATE, pcm_to_float
from megamm.data.images import images_to_tensor, square_rgb
from megamm.data.pipeline import MAX_AUDIO_SAMPLES, padded_audio_length
from megamm.data.tokenizer import Tokenizer
from megamm.fileio import atomic_output

PROCESSOR_FILE = "processor.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1

ImageLike = Union[Image.Image, np.ndarray]
Texts = Union[str, Sequence[str]]


def _as_pil(image: ImageLike, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(
                f"image {index}: a NumPy image must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} "
                f"{image.shape}; convert it with (x * 255).round().astype(np.uint8) or pass a PIL image"
            )
        return Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    raise TypeError(f"image {index}: expected a PIL image or a NumPy uint8 array, got {type(image).__name__}")


class Processor:
    """Tokenizer plus image and audio preprocessing; ``processor(text=..., image=..., audio=...)``
    returns a dict of CPU tensors (see :meth:`__call__`).

    Args:
        tokenizer: the SentencePiece tokenizer the model was trained with.
        image_size: side of the square images (``model.image.image_size``).
        max_length: ids per text (``model.text.max_length``).
        max_audio_samples: clips are cut to this many samples (the training loader's limit).
        sample_rate: the audio's sample rate; inputs are not resampled.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int,
        max_length: int,
        max_audio_samples: int = MAX_AUDIO_SAMPLES,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        if image_size < 1 or max_length < 2 or max_audio_samples < 1:
            raise ValueError(
                f"image_size={image_size}, max_length={max_length}, max_audio_samples={max_audio_samples}: "
                "need image_size >= 1, max_length >= 2 (BOS and EOS) and max_audio_samples >= 1"
            )
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_length = max_length
        self.max_audio_samples = max_audio_samples
        self.sample_rate = sample_rate

    @classmethod
    def for_model(cls, tokenizer: Tokenizer, config: ModelConfig) -> "Processor":
        """The processor of a model of ``config`` (its image size, text length and sample rate)."""
        if tokenizer.vocab_size > config.text.vocab_size:
            raise ConfigError(
                f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids, more than model.text.vocab_size="
                f"{config.text.vocab_size}; use the tokenizer the model was trained with"
            )
        return cls(tokenizer, config.image.image_size, config.text.max_length, sample_rate=config.audio.sample_rate)

    # -- inputs ----------------------------------------------------------------------------------

    def __call__(
        self,
        text: Optional[Texts] = None,
        question: Optional[Texts] = None,
        image: Optional[Union[ImageLike, Sequence[ImageLike]]] = None,
        audio: Optional[Union[np.ndarray, Sequence[np.ndarray]]] = None,
    ) -> dict[str, torch.Tensor]:
        """The model's tensors of the given inputs, one row per sample (a single item is a batch of
        one): ``text_ids``/``text_mask`` and ``question_ids``/``question_mask`` (B, T) int64/bool,
        ``image`` (B, 3, S, S) float32 in [-1, 1], ``audio`` (B, S) float32 and ``audio_lengths``
        (B,) int64. Only the keys of the inputs given are present."""
        out: dict[str, torch.Tensor] = {}
        if text is not None:
            out["text_ids"], out["text_mask"] = self.tokenize(text)
        if question is not None:
            out["question_ids"], out["question_mask"] = self.tokenize(question)
        if image is not None:
            out["image"] = self.images(image)
        if audio is not None:
            out["audio"], out["audio_lengths"] = self.audio(audio)
        return out

    def tokenize(self, texts: Texts) -> tuple[torch.Tensor, torch.Tensor]:
        """A string or a list of them -> ids (B, T) int64 and mask (B, T) bool."""
        rows = [texts] if isinstance(texts, str) else list(texts)
        if not rows or not all(isinstance(row, str) for row in rows):
            raise TypeError(f"text: expected a string or a non-empty list of strings, got {texts!r:.80}")
        encoded = [self.tokenizer.encode(row, self.max_length) for row in rows]
        ids = torch.tensor([ids for ids, _ in encoded], dtype=torch.int64)  # (B, T)
        return ids, torch.tensor([mask for _, mask in encoded], dtype=torch.bool)  # (B, T)

    def images(self, images: Union[ImageLike, Sequence[ImageLike]]) -> torch.Tensor:
        """A PIL image, a NumPy uint8 image (H, W[, C]) or a batch of them (a list, or a (B, H, W, C)
        array) -> (B, 3, S, S) float32 in [-1, 1]."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        rows = list(images)
        if not rows:
            raise ValueError("image: an empty list; give at least one image")
        pixels = [square_rgb(_as_pil(row, index), self.image_size) for index, row in enumerate(rows)]
        return images_to_tensor(np.stack(pixels))  # (B, 3, S, S)

    def audio(self, waveforms: Union[np.ndarray, Sequence[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A mono waveform (S,) at :attr:`sample_rate` (int16 PCM, or float in [-1, 1]), a list of
        them or a (B, S) array -> audio (B, S') float32 zero-padded, lengths (B,) int64."""
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        clips = []
        for index, clip in enumerate(waveforms):
            clip = np.asarray(clip)
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(
                    f"audio {index}: expected a non-empty mono waveform (S,), got shape {clip.shape}; "
                    "average the channels first (x.mean(axis=-1))"
                )
            if clip.dtype == np.int16:
                clip = pcm_to_float(clip[: self.max_audio_samples])
            elif np.issubdtype(clip.dtype, np.floating):
                clip = clip[: self.max_audio_samples].astype(np.float32)
            else:
                raise ValueError(f"audio {index}: expected int16 PCM or floats in [-1, 1], got {clip.dtype}")
            clips.append(clip)
        if not clips:
            raise ValueError("audio: an empty list; give at least one waveform")
        lengths = [len(clip) for clip in clips]
        padded = np.zeros((len(clips), padded_audio_length(max(lengths))), dtype=np.float32)  # (B, S')
        for row, clip in enumerate(clips):
            padded[row, : len(clip)] = clip
        return torch.from_numpy(padded), torch.tensor(lengths, dtype=torch.int64)

    def decode(self, ids: Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]) -> Union[str, list[str]]:
        """Token ids -> text (padding, BOS and EOS dropped): (L,) -> a string, (B, L) -> a list."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if rows and isinstance(rows[0], (list, tuple)):
            return [self.tokenizer.decode(row) for row in rows]
        return self.tokenizer.decode(rows)

    # -- files -----------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """What ``processor.json`` records."""
        return {
            "format_version": FORMAT_VERSION,
            "tokenizer": TOKENIZER_FILE,
            "tokenizer_sha256": self.tokenizer.fingerprint,
            "image_size": self.image_size,
            "max_length": self.max_length,
            "max_audio_samples": self.max_audio_samples,
            "sample_rate": self.sample_rate,
        }

    def save(self, directory: Union[str, Path]) -> None:
        """Write ``tokenizer.model`` and ``processor.json`` into ``directory`` (each atomically)."""
        directory = Path(directory)
        with atomic_output(directory / TOKENIZER_FILE) as handle:
            handle.write(self.tokenizer._proto)  # the model file as loaded (its fingerprint), not as it is on disk now
        with atomic_output(directory / PROCESSOR_FILE) as handle:
            handle.write((json.dumps(self.settings(), indent=2) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Processor":
        """The processor :meth:`save` wrote into ``directory``.

        Raises:
            ConfigError: a file is missing or unreadable, or the tokenizer is not the one recorded.
        """
        directory = Path(directory)
        path = directory / PROCESSOR_FILE
        if not path.is_file():
            raise ConfigError(
                f"{directory} holds no {PROCESSOR_FILE}: it is not a pretrained model directory; write one with "
                "save_pretrained or tools/export_checkpoint.py"
            )
        try:
            settings = json.loads(path.read_text())
            version = settings["format_version"]
            kwargs = {key: int(settings[key]) for key in ("image_size", "max_length", "max_audio_samples", "sample_rate")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{path} is unreadable ({error!r}); write the directory again") from None
        if version > FORMAT_VERSION:
            raise ConfigError(f"{path} has format_version {version}; this megamm reads up to {FORMAT_VERSION}: upgrade megamm")
        tokenizer = Tokenizer(directory / str(settings.get("tokenizer", TOKENIZER_FILE)), field_name=f"{directory}: tokenizer")
        recorded = settings.get("tokenizer_sha256")
        if recorded is not None and recorded != tokenizer.fingerprint:
            raise ConfigError(
                f"{tokenizer.path} is not the tokenizer {path} records (sha256 {tokenizer.fingerprint[:12]}... != "
                f"{recorded[:12]}...); copy the model's own tokenizer back or write the directory again"
            )
        return cls(tokenizer, **kwargs)

    def __repr__(self) -> str:
        return (
            f"Processor(tokenizer={self.tokenizer!r}, image_size={self.image_size}, max_length={self.max_length}, "
            f"max_audio_samples={self.max_audio_samples})"
        )


__all__ = ["PROCESSOR_FILE", "TOKENIZER_FILE", "Processor"]
