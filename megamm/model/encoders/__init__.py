"""Modality encoders: token/patch features -> transformer -> pooled features."""

from megamm.model.encoders.audio import AudioEncoder, AudioPatchEmbedding
from megamm.model.encoders.image import ImageEncoder
from megamm.model.encoders.melspec import LogMelSpectrogram
from megamm.model.encoders.text import TextEncoder

__all__ = ["AudioEncoder", "AudioPatchEmbedding", "ImageEncoder", "LogMelSpectrogram", "TextEncoder"]
