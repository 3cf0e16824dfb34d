"""Audio for the data layer: decoding WAV and FLAC clips to 16 kHz mono float, 16 kHz mono 16-bit
PCM WAV files, and the demo's beep synthesiser.

:func:`decode_audio` is what the loaders call for every clip: WAV (``wav``) or FLAC (``flac``)
bytes -> (S,) float32 mono in [-1, 1] at a given rate (:data:`SAMPLE_RATE` by default). The bytes
decide the container: RIFF/WAVE integer PCM (8-bit unsigned, 16/24/32-bit signed) is read with
the standard library's :mod:`wave`; FLAC, and WAV that :mod:`wave` cannot read (IEEE float,
WAVE_FORMAT_EXTENSIBLE), with :mod:`soundfile` (libsndfile). Integers are scaled by their width
(``v / 2**(bits - 1)``; 8-bit ``(v - 128) / 128``), channels are averaged, and a clip at another
rate is resampled by :func:`resample` (a Kaiser-windowed sinc, polyphase, cut-off at the lower
Nyquist frequency). With ``max_samples`` only the input that those output samples depend on is
decoded and resampled. :func:`audio_info` reads a header only (for screening samples cheaply).

:func:`encode_wav` and :func:`decode_wav` write and read the demo's own files: 16-bit PCM at
:data:`SAMPLE_RATE` (any other rate or width is refused by :func:`decode_wav`, not resampled);
several channels are averaged to one and rounded. Samples are 16-bit signed little-endian PCM;
:func:`pcm_to_float` maps them to float32 in [-1, 1) by dividing by 32768, exactly as
:func:`decode_audio` reads the same file.

:func:`synthesize_beeps` renders ``beeps`` equally spaced tone bursts whose pitch follows a
contour over the clip (see :data:`CONTOURS`), at a given peak level, over white noise. It knows
nothing of shapes and colours: :mod:`megamm.data.demo` maps a sample's attributes to its arguments.
"""

from __future__ import annotations

import functools
import io
import math
import re
import struct
import wave
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np

SAMPLE_RATE = 16_000
"""Samples per second of every clip written or read."""
AUDIO_EXTENSIONS: tuple[str, ...] = ("flac", "wav")
"""Sample keys (file extensions) holding a clip that :func:`decode_audio` reads."""
_SAMPLE_WIDTH = 2  # bytes: 16-bit PCM


class AudioError(ValueError):
    """The bytes are not a usable audio clip; the message says why."""


class WavError(AudioError):
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
# Decoding any WAV or FLAC clip


@dataclass(frozen=True)
class AudioInfo:
    """What an audio header says."""

    sample_rate: int
    channels: int
    frames: int
    """Samples per channel."""


def audio_info(data: bytes, extension: str) -> AudioInfo:
    """Read and check only the header of a ``wav`` or ``flac`` clip (cheap: nothing is decoded).

    Raises:
        AudioError: empty, not a clip :func:`decode_audio` reads, no samples, no sample count
            (a streamed FLAC), a sample rate outside 1 kHz..1 MHz, or (WAV) fewer sample bytes
            than the header announces.
        ValueError: ``extension`` is not one of :data:`AUDIO_EXTENSIONS`.
    """
    _check_extension(extension)
    with _open_clip(data) as clip:
        return AudioInfo(clip.rate, clip.channels, clip.frames)


def decode_audio(
    data: bytes, extension: str, sample_rate: int = SAMPLE_RATE, max_samples: Optional[int] = None
) -> np.ndarray:
    """WAV or FLAC bytes -> (S,) float32 mono in [-1, 1] at ``sample_rate``.

    The bytes decide the container (``extension`` must be one of :data:`AUDIO_EXTENSIONS`, and a
    WAV under a ``flac`` key, or the reverse, is read all the same). Channels are averaged; a clip
    at another rate is resampled (:func:`resample`); ``S = ceil(frames * sample_rate / rate)``
    (:func:`resampled_length`), or at most ``max_samples``, in which case only the frames those samples depend on (the
    filter's reach beyond the last one) are decoded and resampled. Results are clipped to
    [-1, 1] (a float WAV may exceed it; so may a resampled full-scale square wave).

    Raises:
        AudioError: empty, not WAV/FLAC (or another format libsndfile reads), undecodable, no
            samples, a sample rate outside 1 kHz..1 MHz, no sample count in the header (a
            streamed FLAC: libsndfile cannot read one to its end), truncated (fewer sample bytes
            than a WAV header announces; a FLAC whose frames stop before its header's sample
            count), or NaN/infinite samples.
        ValueError: a bad ``extension``, ``sample_rate`` or ``max_samples`` (the caller's error).
    """
    _check_extension(extension)
    _check_positive("sample_rate", sample_rate)
    if max_samples is not None:
        _check_positive("max_samples", max_samples)
    with _open_clip(data) as clip:
        wanted = resampled_length(clip.frames, clip.rate, sample_rate)  # output samples of the whole clip
        if max_samples is not None:
            wanted = min(wanted, max_samples)
        mono = clip.read_mono(min(clip.frames, input_frames_needed(wanted, clip.rate, sample_rate)))  # (N,)
        rate = clip.rate
    if not np.isfinite(mono).all():
        raise AudioError("non-finite samples (NaN or infinity)")
    if rate != sample_rate:
        mono = resample(mono, rate, sample_rate, max_samples)
    elif max_samples is not None:
        mono = mono[:max_samples]
    return np.clip(mono, -1.0, 1.0, out=mono)


def _check_extension(extension: str) -> None:
    if not isinstance(extension, str) or extension.lower().lstrip(".") not in AUDIO_EXTENSIONS:
        raise ValueError(f"audio extension {extension!r}; expected one of {', '.join(AUDIO_EXTENSIONS)}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


_MIN_RATE, _MAX_RATE = 1000, 1_000_000  # Hz: a header outside is corrupt (or not audio to train on)


class _Clip:
    """An open clip: its header and :meth:`read_mono`."""

    rate: int
    channels: int
    frames: int

    def read_mono(self, frames: int) -> np.ndarray:
        """The first ``frames`` frames -> (frames,) float32, channels averaged."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Clip":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_clip(data: bytes) -> _Clip:
    """Sniff and open ``data`` (:func:`_open_any`) and check its sample rate."""
    clip = _open_any(data)
    if not _MIN_RATE <= clip.rate <= _MAX_RATE:
        clip.close()
        raise AudioError(f"implausible sample rate {clip.rate} Hz")
    return clip


def _open_any(data: bytes) -> _Clip:
    """Integer PCM WAV with :mod:`wave`, anything else with soundfile."""
    if not data:
        raise AudioError("empty (0 bytes)")
    data = bytes(data)
    riff = len(data) >= 12 and data[:4] in (b"RIFF", b"RIFX") and data[8:12] == b"WAVE"
    if riff:
        _check_wav_length(data)
        try:
            reader = wave.open(io.BytesIO(data), "rb")
        except (wave.Error, EOFError, ValueError, struct.error):
            pass  # float, WAVE_FORMAT_EXTENSIBLE, an odd chunk order, ...: libsndfile reads those
        else:
            return _PcmWav(reader)
    return _LibsndfileClip(data)


def _check_wav_length(data: bytes) -> None:
    """Walk a RIFF/RIFX file's chunks to ``data``; refuse it if fewer bytes follow than it says."""
    endian = "<" if data[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack(endian + "I", data[offset + 4 : offset + 8])[0]
        offset += 8
        if chunk_id == b"data":
            available = len(data) - offset
            if size not in (0, 0xFFFFFFFF) and available < size:  # 0 / all ones: a streamed file's size
                raise AudioError(f"truncated: {available} of {size} sample bytes")
            return
        offset += size + (size & 1)  # chunks are padded to an even length
    raise AudioError("WAV without a data chunk (or truncated before it)")


class _PcmWav(_Clip):
    """Integer PCM WAV, read with :mod:`wave`."""

    def __init__(self, reader: wave.Wave_read) -> None:
        self.reader = reader
        self.rate, self.channels = reader.getframerate(), reader.getnchannels()
        self.width, self.frames = reader.getsampwidth(), reader.getnframes()
        if self.width not in (1, 2, 3, 4) or self.channels < 1 or self.rate < 1:
            self.close()
            raise AudioError(f"unusable WAV header ({self.channels} channels, {8 * self.width}-bit, {self.rate} Hz)")
        if self.frames < 1:
            self.close()
            raise AudioError("no samples")

    def read_mono(self, frames: int) -> np.ndarray:
        try:
            raw = self.reader.readframes(frames)
        except (wave.Error, EOFError) as err:
            raise AudioError(f"unreadable sample data ({type(err).__name__}: {err})") from None
        expected = frames * self.channels * self.width
        if len(raw) != expected:
            raise AudioError(f"truncated: {len(raw)} of {expected} sample bytes")
        return _pcm_to_mono(raw, self.width, self.channels)

    def close(self) -> None:
        self.reader.close()


def _pcm_to_mono(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM (8-bit unsigned, 16/24/32-bit signed) -> (N,) float32 mono:
    ``v / 2**(bits - 1)`` (8-bit: ``(v - 128) / 128``), channels averaged."""
    if width == 1:
        values = np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0
    elif width == 2:
        values = np.frombuffer(raw, "<i2").astype(np.float32)
    elif width == 3:  # an int32 every 3 bytes, from one byte early: the sample in its top 3 bytes
        early = b"\0" + raw
        values = (np.ndarray((len(raw) // 3,), "<i4", early, 0, (3,)) >> 8).astype(np.float32)
    else:
        values = np.frombuffer(raw, "<i4").astype(np.float32)
    scale = np.float32(2.0 ** -(8 * width - 1))  # 2**-(bits - 1), exact
    return _mix_down(values.reshape(-1, channels), scale)


def _mix_down(frames: np.ndarray, scale: float | np.floating = 1.0) -> np.ndarray:
    """(N, C) float32 -> (N,) float32: ``scale * mean over channels`` (a loop over channels:
    numpy's reductions over a short last axis are an order of magnitude slower)."""
    mono = frames[:, 0] * np.float32(scale / frames.shape[1])  # a copy
    for channel in range(1, frames.shape[1]):
        mono += frames[:, channel] * np.float32(scale / frames.shape[1])
    return mono


_UNKNOWN_FRAMES = 2**62  # libsndfile's frame count when a header does not say (SF_COUNT_MAX)
_READ_BLOCK_SAMPLES = 1 << 15  # samples (frames x channels) decoded at a time: 128 KiB of float32


class _LibsndfileClip(_Clip):
    """FLAC, and WAV that :mod:`wave` cannot read, through soundfile (libsndfile)."""

    def __init__(self, data: bytes) -> None:
        import soundfile  # a dependency; imported here so that WAV-only users never load libsndfile

        try:
            self.file = soundfile.SoundFile(io.BytesIO(data))
        except Exception as err:  # LibsndfileError (a RuntimeError), TypeError, ValueError, ...
            raise AudioError(f"undecodable ({_reason(err)})") from None
        self.rate, self.channels = self.file.samplerate, self.file.channels
        self.frames = self.file.frames
        if self.rate < 1 or self.channels < 1:
            self.close()
            raise AudioError(f"unusable header ({self.channels} channels, {self.rate} Hz)")
        if self.frames >= _UNKNOWN_FRAMES:
            self.close()
            raise AudioError("no sample count in the header (a streamed FLAC?); re-encode it to a file")
        if self.frames == 0:
            self.close()
            raise AudioError("no samples")

    def read_mono(self, frames: int) -> np.ndarray:
        try:
            mono = self._read_blocks(frames)
            if len(mono) != frames:
                raise AudioError(f"truncated: {len(mono)} of {frames} frames")
            if frames < self.frames:  # the rest is not decoded, but it must be there:
                self.file.seek(self.frames - 1)  # a cheap seek in FLAC (fails if it is cut short)
                if len(self.file.read(1, dtype="float32", always_2d=True)) != 1:
                    raise AudioError(f"truncated: fewer than the {self.frames} frames the header says")
        except AudioError:
            raise
        except Exception as err:
            raise AudioError(f"undecodable or truncated ({_reason(err)})") from None
        return mono

    def _read_blocks(self, frames: int) -> np.ndarray:
        """Up to ``frames`` frames -> (N,) float32 mono, decoded and mixed down a cache-sized
        block at a time."""
        block_frames = max(1, _READ_BLOCK_SAMPLES // self.channels)
        buffer = np.empty((min(frames, block_frames), self.channels), np.float32)
        pieces, total = [], 0
        while total < frames:
            want = min(block_frames, frames - total)
            block = self.file.read(want, dtype="float32", always_2d=True, out=buffer[:want])  # (n, C)
            pieces.append(_mix_down(block))
            total += len(block)
            if len(block) < want:
                break
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def close(self) -> None:
        self.file.close()


def _reason(err: Exception) -> str:
    """``Type: message`` without the in-memory file's address (the same error reads the same)."""
    message = re.sub(r"(Error opening )?<_io\.BytesIO object at 0x[0-9a-f]+>:? ?", "", str(err))
    return f"{type(err).__name__}: {message}"


# ----------------------------------------------------------------------------------------------
# Resampling: a Kaiser-windowed sinc, applied polyphase as a few matrix products

_ZERO_CROSSINGS = 16
"""Zero crossings of the sinc on each side of the centre (at the lower rate): the filter spans
32 periods of the lower rate."""
_KAISER_BETA = 6.0
"""Kaiser window shape: with 16 zero crossings, passband ripple < 0.01 dB up to 7/8 of the lower
Nyquist frequency, -6 dB at it, < -60 dB from 9/8 of it (so 44.1 kHz -> 16 kHz keeps 7 kHz and
folds nothing above 9 kHz back)."""


@dataclass(frozen=True)
class _Plan:
    """How to resample between two rates: rows of ``row_out`` outputs that advance ``row_in``
    inputs each; output column ``c`` of a row sits at input time ``c * down / up`` from the row's
    start. Each group (c0, c1, lo, filt) computes columns [c0, c1) of every row as
    ``inputs[row_start + lo : row_start + lo + span] @ filt`` with ``filt`` (span, c1 - c0)."""

    up: int
    down: int
    reach: float
    """Half the filter's length in input samples."""
    row_out: int
    row_in: int
    groups: tuple[tuple[int, int, int, np.ndarray], ...]


def _kaiser_sinc(t: np.ndarray, cutoff: float, reach: float) -> np.ndarray:
    """The low-pass impulse response at input-sample offsets ``t``: ``2 fc sinc(2 fc t)`` (cut-off
    ``fc`` in cycles per input sample) times a Kaiser window of half-length ``reach``."""
    u = np.clip(1.0 - (t / reach) ** 2, 0.0, None)
    window = np.where(np.abs(t) < reach, np.i0(_KAISER_BETA * np.sqrt(u)) / np.i0(_KAISER_BETA), 0.0)
    return 2.0 * cutoff * np.sinc(2.0 * cutoff * t) * window


MAX_RATIO_TERM = 1000
"""The largest term of a resampling ratio (see :func:`resampling_ratio`)."""
_SINGLE_THREAD_GEMM = 1 << 18
"""Products are cut into pieces of at most this many multiply-adds (m * n * k), under which
OpenBLAS stays on one thread: a threaded product this small is tens of times slower when the
loader's worker processes already use every core."""


def resampling_ratio(src_rate: int, dst_rate: int) -> tuple[int, int]:
    """``(up, down)``: :func:`resample` makes ``up`` outputs of every ``down`` inputs.

    ``dst_rate / src_rate`` in lowest terms when both terms are at most :data:`MAX_RATIO_TERM`
    (every pair of the usual rates: 44.1 kHz -> 16 kHz is 160/441); otherwise the closest
    fraction whose terms are (44,101 Hz -> 16 kHz becomes 119/328, a rate error of 4e-6), so
    that the filter bank stays small whatever a header claims.

    Raises:
        ValueError: a rate is not a positive integer, or one is over :data:`MAX_RATIO_TERM` times
            the other.
    """
    _check_positive("src_rate", src_rate)
    _check_positive("dst_rate", dst_rate)
    if max(src_rate, dst_rate) > MAX_RATIO_TERM * min(src_rate, dst_rate):
        raise ValueError(f"cannot resample {src_rate} Hz to {dst_rate} Hz: over {MAX_RATIO_TERM}:1")
    common = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // common, src_rate // common
    if max(up, down) <= MAX_RATIO_TERM:
        return up, down
    if up < down:  # bounding the larger term bounds both
        near = Fraction(up, down).limit_denominator(MAX_RATIO_TERM)
        return near.numerator, near.denominator
    near = Fraction(down, up).limit_denominator(MAX_RATIO_TERM)
    return near.denominator, near.numerator


def resampled_length(frames: int, src_rate: int, dst_rate: int) -> int:
    """Samples :func:`resample` makes of ``frames`` inputs: ``ceil(frames * up / down)``."""
    if src_rate == dst_rate:
        return frames
    up, down = resampling_ratio(src_rate, dst_rate)
    return -(-frames * up // down)


@functools.lru_cache(maxsize=16)
def _plan(up: int, down: int) -> _Plan:
    cutoff = 0.5 * min(1.0, up / down)  # the lower Nyquist frequency, in cycles per input sample
    reach = _ZERO_CROSSINGS / (2.0 * cutoff)
    # A group's outputs advance over about one filter length of input, so each product reads
    # about twice the taps it needs; a row holds whole periods of the up/down pattern.
    group = max(1, round(2.0 * reach * up / down))
    blocks = -(-group // up)
    row_out, row_in = blocks * up, blocks * down
    groups = []
    for c0 in range(0, row_out, group):
        c1 = min(c0 + group, row_out)
        centres = np.arange(c0, c1) * down / up  # (G,) input time of each output
        lo = math.floor(centres[0] - reach)
        taps = np.arange(lo, math.ceil(centres[-1] + reach) + 1)  # (span,) input indices
        filt = _kaiser_sinc(centres[None, :] - taps[:, None], cutoff, reach)  # (span, G)
        filt /= filt.sum(axis=0, keepdims=True)  # every phase passes DC exactly
        groups.append((c0, c1, lo, filt.astype(np.float32)))
    return _Plan(up, down, reach, row_out, row_in, tuple(groups))


def input_frames_needed(samples: int, src_rate: int, dst_rate: int) -> int:
    """Input frames that the first ``samples`` outputs of :func:`resample` depend on."""
    if samples < 1:
        return 0
    if src_rate == dst_rate:
        return samples
    plan = _plan(*resampling_ratio(src_rate, dst_rate))
    return math.floor((samples - 1) * plan.down / plan.up + plan.reach) + 1


def resample(
    waveform: np.ndarray, src_rate: int, dst_rate: int, max_samples: Optional[int] = None
) -> np.ndarray:
    """(N,) samples at ``src_rate`` -> (ceil(N * up / down),) float32 at ``dst_rate`` (at most
    ``max_samples``), band-limited; ``up / down`` is ``dst_rate / src_rate``
    (:func:`resampling_ratio`).

    Output ``n`` is the input's band-limited value at input time ``n * down / up``: a sum over
    the inputs within 16 periods of the lower rate, weighted by a Kaiser-windowed (beta 6) sinc
    cut off at the lower rate's Nyquist frequency, the weights of each phase normalised to sum
    to 1. The input is zero outside [0, N). The ``up`` phases are evaluated as a few matrix
    products over strided views of the input.

    Raises:
        ValueError: not a 1-D waveform, or rates :func:`resampling_ratio` refuses.
    """
    up, down = resampling_ratio(src_rate, dst_rate)
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D waveform, got shape {x.shape}")
    n_out = -(-len(x) * up // down)
    if max_samples is not None:
        n_out = min(n_out, max_samples)
    if up == down:
        return x[:n_out].copy()
    if n_out < 1:
        return np.zeros(0, np.float32)
    plan = _plan(up, down)
    rows = -(-n_out // plan.row_out)
    used = min(len(x), input_frames_needed(n_out, src_rate, dst_rate))
    pad = max(0, -min(lo for _, _, lo, _ in plan.groups))
    end = max(lo + filt.shape[0] for _, _, lo, filt in plan.groups)  # past the last row's start
    padded = np.zeros(max(pad + (rows - 1) * plan.row_in + end, pad + used), np.float32)
    padded[pad : pad + used] = x[:used]
    out = np.empty((rows, plan.row_out), np.float32)
    step = padded.strides[0]
    for c0, c1, lo, filt in plan.groups:
        windows = np.lib.stride_tricks.as_strided(
            padded[pad + lo :], shape=(rows, filt.shape[0]), strides=(plan.row_in * step, step), writeable=False
        )  # (rows, span): overlapping views of the input
        chunk = max(1, _SINGLE_THREAD_GEMM // filt.size)
        for r0 in range(0, rows, chunk):
            out[r0 : r0 + chunk, c0:c1] = np.ascontiguousarray(windows[r0 : r0 + chunk]) @ filt
    return out.reshape(-1)[:n_out]


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
