"""Modality encoders: token/patch features -> transformer -> pooled features."""

from megamm.model.encoders.image import ImageEncoder
from megamm.model.encoders.melspec import LogMelSpectrogram
from megamm.model.encoders.text import TextEncoder

__all__ = ["ImageEncoder", "LogMelSpectrogram", "TextEncoder"]
