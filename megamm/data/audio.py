"""Audio for the data layer: 16 kHz mono 16-bit PCM WAV files, and the demo's beep synthesiser.

WAV files are written and read with the standard library's :mod:`wave` module (no soundfile,
torchaudio or librosa). Samples are 16-bit signed little-endian PCM; :func:`pcm_to_float` maps
them to float32 in [-1, 1) by dividing by 32768.

:func:`decode_wav` accepts 16-bit PCM at :data:`SAMPLE_RATE` only (any other sample rate or width
is refused, not resampled); several channels are averaged to one.

:func:`synthesize_beeps` renders ``beeps`` equally spaced tone bursts whose pitch follows a
contour over the clip (see :data:`CONTOURS`), at a given peak level, over white noise. It knows
nothing of shapes and colours: :mod:`megamm.data.demo` maps a sample's attributes to its arguments.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
"""Samples per second of every clip written or read."""
_SAMPLE_WIDTH = 2  # bytes: 16-bit PCM


class WavError(ValueError):
    """The bytes are not a usable 16 kHz 16-bit PCM WAV file."""


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header says."""

    channels: int
    frames: int
    """Samples per channel."""


def encode_wav(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """(S,) int16 mono samples -> the bytes of a 16-bit PCM WAV file."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1 or pcm.dtype != np.int16:
        raise ValueError(f"expected a 1-D int16 array, got {pcm.dtype} of shape {pcm.shape}")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(_SAMPLE_WIDTH)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm.astype("<i2", copy=False).tobytes())
    return buffer.getvalue()


def _open(data: bytes) -> wave.Wave_read:
    try:
        return wave.open(io.BytesIO(data), "rb")
    except (wave.Error, EOFError, ValueError) as err:
        raise WavError(f"not a PCM WAV file ({type(err).__name__}: {err})") from None


def _check_header(reader: wave.Wave_read) -> WavInfo:
    channels, width, rate, frames = (
        reader.getnchannels(), reader.getsampwidth(), reader.getframerate(), reader.getnframes()
    )
    if width != _SAMPLE_WIDTH:
        raise WavError(f"{8 * width}-bit samples; expected 16-bit PCM")
    if rate != SAMPLE_RATE:
        raise WavError(f"sample rate {rate} Hz; expected {SAMPLE_RATE} Hz (audio is not resampled)")
    if channels < 1:
        raise WavError("no channels")
    if frames < 1:
        raise WavError("no samples")
    return WavInfo(channels, frames)


def wav_info(data: bytes) -> WavInfo:
    """Read and check only the header (cheap); raises :class:`WavError` if it is unusable."""
    with _open(data) as reader:
        return _check_header(reader)


def decode_wav(data: bytes) -> np.ndarray:
    """WAV bytes -> (S,) int16 mono samples; several channels are averaged (rounded).

    Raises:
        WavError: not a WAV file, not 16-bit PCM at :data:`SAMPLE_RATE`, empty, or with fewer
            sample bytes than its header announces (truncated).
    """
    with _open(data) as reader:
        info = _check_header(reader)
        try:
            raw = reader.readframes(info.frames)
        except (wave.Error, EOFError) as err:
            raise WavError(f"unreadable sample data ({type(err).__name__}: {err})") from None
    expected = info.frames * info.channels * _SAMPLE_WIDTH
    if len(raw) != expected:
        raise WavError(f"truncated: {len(raw)} of {expected} sample bytes")
    pcm = np.frombuffer(raw, dtype="<i2")
    if info.channels == 1:
        return pcm.astype(np.int16)
    mixed = pcm.reshape(info.frames, info.channels).astype(np.float64).mean(axis=1)
    return np.round(mixed).astype(np.int16)


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1): ``pcm / 32768``."""
    return pcm.astype(np.float32) / 32768.0


def float_to_pcm(waveform: np.ndarray) -> np.ndarray:
    """float samples (clipped to [-1, 1]) -> int16: ``round(x * 32767)``."""
    return np.round(np.clip(waveform, -1.0, 1.0) * 32767.0).astype(np.int16)


# ----------------------------------------------------------------------------------------------
# Beep synthesis

CONTOURS: tuple[str, ...] = ("steady", "rising", "falling", "vibrato", "arch")
"""Pitch contours over a clip of normalised time ``u`` in [0, 1], in semitones from the base pitch
(``g`` = :data:`GLIDE_SEMITONES`): steady 0; rising ``-g -> +g``; falling ``+g -> -g``; vibrato
``0.75 g sin(2 pi 5 Hz t + phase)``; arch ``-g -> +g -> -g`` (up, then down)."""
GLIDE_SEMITONES = 2.0
_VIBRATO_HZ = 5.0
_RAMP_SECONDS = 0.008  # raised-cosine attack and release of each beep


def pitch_contour(kind: str, samples: int, phase: float = 0.0) -> np.ndarray:
    """(samples,) semitone offsets of contour ``kind`` (one of :data:`CONTOURS`) over a clip."""
    u = np.linspace(0.0, 1.0, samples, endpoint=False)
    g = GLIDE_SEMITONES
    if kind == "steady":
        return np.zeros(samples)
    if kind == "rising":
        return -g + 2 * g * u
    if kind == "falling":
        return g - 2 * g * u
    if kind == "vibrato":
        t = np.arange(samples) / SAMPLE_RATE
        return 0.75 * g * np.sin(2 * np.pi * _VIBRATO_HZ * t + phase)
    if kind == "arch":
        return g - 2 * g * np.abs(2 * u - 1)
    raise ValueError(f"unknown contour {kind!r}; expected one of {', '.join(CONTOURS)}")


def beep_envelope(rng: np.random.Generator, samples: int, beeps: int, duty: float) -> np.ndarray:
    """(samples,) gain in [0, 1]: ``beeps`` bursts, one centred (with jitter) in each of ``beeps``
    equal slots, each ``duty`` of its slot long, with raised-cosine ramps; silence between."""
    envelope = np.zeros(samples)
    slot = samples / beeps
    length = max(int(duty * slot), 2)
    ramp = min(int(_RAMP_SECONDS * SAMPLE_RATE), length // 2)
    shape = np.ones(length)
    if ramp > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        shape[:ramp], shape[length - ramp :] = rise, rise[::-1]
    spare = slot - length
    for index in range(beeps):
        start = int(index * slot + spare / 2 + rng.uniform(-0.4, 0.4) * spare / 2)
        start = min(max(start, 0), samples - length)
        envelope[start : start + length] = shape
    return envelope


def synthesize_beeps(
    rng: np.random.Generator,
    *,
    pitch_hz: float,
    contour: str,
    beeps: int,
    level_db: float,
    seconds: float,
    duty: float,
    noise_std: float,
) -> np.ndarray:
    """A clip of ``beeps`` sine bursts at ``pitch_hz`` following ``contour``, peaking at
    ``level_db`` dBFS, plus white noise of standard deviation ``noise_std``; (S,) int16.

    Args:
        rng: source of the beep timing jitter, the vibrato phase and the noise.
        duty: fraction of each beep's slot that sounds (the rest is silence).
    """
    samples = int(round(seconds * SAMPLE_RATE))
    semitones = pitch_contour(contour, samples, phase=float(rng.uniform(0, 2 * np.pi)))
    frequency = pitch_hz * 2.0 ** (semitones / 12.0)  # (S,) instantaneous Hz
    phase = 2 * np.pi * np.cumsum(frequency) / SAMPLE_RATE + rng.uniform(0, 2 * np.pi)
    tone = np.sin(phase) * beep_envelope(rng, samples, beeps, duty) * 10.0 ** (level_db / 20.0)
    return float_to_pcm(tone + rng.normal(0.0, noise_std, samples))
