"""Log-mel spectrogram in torch: waveform (B, S) -> log-mel (B, n_mels, frames), with frame masks
for padded audio. No torchaudio, no librosa: the STFT is ``torch.stft`` and the mel filterbank is
computed here.

The definition (``LogMelSpectrogram``, defaults in brackets):

1. Each example is extended at both ends by ``n_fft // 2`` samples mirrored about its first and its
   last *real* sample (``numpy.pad(x[:length], n_fft // 2, mode="reflect")``; audio shorter than
   that is mirrored back and forth, as numpy does). For unpadded audio this is exactly
   ``torch.stft(center=True, pad_mode="reflect")``, librosa's and torchaudio's default.
2. Frames of ``n_fft`` [400 = 25 ms at 16 kHz] samples every ``hop_length`` [160 = 10 ms]
   samples, times a periodic Hann window of length ``n_fft``; ``1 + samples // hop_length`` frames,
   frame ``t`` centred on sample ``t * hop_length``.
3. Power spectrum ``|rfft(frame)|^2`` (``n_fft // 2 + 1`` bins, bin ``k`` at ``k * sample_rate / n_fft`` Hz).
4. Mel filterbank (:func:`mel_filterbank`): ``n_mels`` [128] triangular filters on the Slaney mel
   scale (linear below 1 kHz, logarithmic above; Auditory Toolbox, librosa's default
   ``htk=False``) between ``f_min`` [0] and ``f_max`` [sample_rate / 2], each with area
   normalisation (``norm="slaney"``: peak ``2 / (upper edge - lower edge)`` in Hz), i.e.
   ``librosa.filters.mel(sr, n_fft, n_mels, f_min, f_max)``.
5. Natural log with an additive floor: ``log(mel + eps)`` [eps = 1e-6].
6. Normalisation: ``(log_mel - mean) / std`` [mean 0, std 1: none]. AST normalises its
   AudioSet Kaldi fbanks with mean -4.27 and 2 x 4.57; those constants belong to Kaldi's scale
   (HTK mel, no area normalisation, power of 16-bit integer samples), so measure this module's
   output on the training data instead.

Padded audio (``lengths`` given): frame ``t`` of example ``b`` is *real* when
``t <= lengths[b] // hop_length``, exactly the frames ``waveform[b, :lengths[b]]`` has on its own,
and each real frame equals that frame of the example computed alone (step 1 mirrors the example's
own last samples, never the batch's padding, so nothing after ``lengths[b]`` reaches any frame:
there is no boundary exception). The other frames are set to 0, the normalised value of
``mean``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

# The Slaney mel scale: 3 mels per 200 Hz up to 1 kHz (15 mels), then 27 mels per factor 6.4 in Hz.
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _LINEAR_HZ_PER_MEL  # 15
_LOG_STEP = math.log(6.4) / 27.0  # log(Hz) per mel above the break


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney mel scale (librosa's ``hz_to_mel(htk=False)``): linear below 1 kHz, log above."""
    linear = hz / _LINEAR_HZ_PER_MEL
    log = _BREAK_MEL + torch.log(torch.clamp(hz, min=_BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return torch.where(hz >= _BREAK_HZ, log, linear)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    linear = mel * _LINEAR_HZ_PER_MEL
    log = _BREAK_HZ * torch.exp(_LOG_STEP * (torch.clamp(mel, min=_BREAK_MEL) - _BREAK_MEL))
    return torch.where(mel >= _BREAK_MEL, log, linear)


def _hz_to_mel(hz: float) -> float:
    return hz / _LINEAR_HZ_PER_MEL if hz < _BREAK_HZ else _BREAK_MEL + math.log(hz / _BREAK_HZ) / _LOG_STEP


# The filterbank is built from Python floats, ``torch.linspace`` and integer ``torch.arange`` only:
# under DeepSpeed's ``zero.Init`` with bf16 or fp16, floating ``torch.tensor`` / ``arange`` / ``zeros``
# ... are created in the training dtype, which would round the filter edges.


def mel_frequencies(n_mels: int, f_min: float, f_max: float) -> torch.Tensor:
    """The ``n_mels + 2`` filter edges in Hz (float64), evenly spaced in mel from ``f_min`` to
    ``f_max``: filter ``i`` rises from edge ``i``, peaks at edge ``i + 1`` (its centre) and falls to
    edge ``i + 2``."""
    mels = torch.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2, dtype=torch.float64, device="cpu")
    return mel_to_hz(mels)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: Optional[float] = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) float64 on the CPU: Slaney-scale triangular filters with area
    normalisation, as ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min,
    fmax=f_max)``.

    Filter ``i`` at frequency ``f`` (edges ``lo, c, hi`` = :func:`mel_frequencies` ``[i : i + 3]``)
    is ``max(0, min((f - lo) / (c - lo), (hi - f) / (hi - c))) * 2 / (hi - lo)``.
    """
    f_max = sample_rate / 2.0 if f_max is None else f_max
    edges = mel_frequencies(n_mels, f_min, f_max)  # (n_mels + 2,) Hz
    bins = torch.arange(n_fft // 2 + 1, device="cpu").to(torch.float64)  # integer arange: see above
    freqs = bins * (sample_rate / n_fft)  # (K,) Hz of each bin
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (freqs - lo) / (centre - lo)  # (n_mels, K)
    falling = (hi - freqs) / (hi - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0) * (2.0 / (hi - lo))


def reflect_indices(lengths: torch.Tensor, total: int, pad: int) -> torch.Tensor:
    """(B, total + 2 * pad) int64: for each example the sample index that position ``p - pad`` of
    its reflect-padded signal reads, mirroring about the example's first and last real samples
    (``lengths`` (B,), at least 1), back and forth when the example is shorter than ``pad``, as
    ``numpy.pad(mode="reflect")``."""
    positions = torch.arange(-pad, total + pad, device=lengths.device)[None, :]  # (1, P)
    length = lengths[:, None].to(torch.int64)  # (B, 1)
    period = torch.clamp(2 * (length - 1), min=1)  # a length-1 example repeats its one sample
    folded = torch.remainder(positions, period)  # (B, P), in [0, period)
    return torch.where(folded < length, folded, period - folded)


class LogMelSpectrogram(nn.Module):
    """Waveform (B, S) float in [-1, 1] at ``sample_rate`` -> log-mel (B, n_mels, 1 + S // hop_length),
    and with ``lengths`` (B,) valid samples per example also the frame mask (B, frames) bool.

    The definition, and the rule for padded audio, are in this module's docstring. No trainable
    parameters: the Hann window and the filterbank are non-persistent buffers (not in the state
    dict). They stay float32 (or float64 after ``.double()``) when the module is cast to half
    precision, and the spectrogram is computed in their dtype (``torch.stft`` has no bfloat16 kernel
    and the log of a half-precision power spectrum loses the quiet bins); the output has that dtype.
    """

    window: torch.Tensor
    mel_filters: torch.Tensor

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        n_mels: int = 128,
        f_min: float = 0.0,
        f_max: Optional[float] = None,
        eps: float = 1e-6,
        mean: float = 0.0,
        std: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise ValueError(f"sample_rate={sample_rate!r} must be a positive integer number of samples per second (Hz)")
        if n_fft < 2 or hop_length < 1:
            raise ValueError(f"n_fft={n_fft} must be at least 2 and hop_length={hop_length} at least 1")
        if n_mels < 1:
            raise ValueError(f"n_mels={n_mels} must be at least 1")
        f_max = sample_rate / 2.0 if f_max is None else float(f_max)
        if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
            raise ValueError(
                f"need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2:g} Hz; got f_min={f_min:g}, f_max={f_max:g}"
            )
        if eps <= 0 or std <= 0:
            raise ValueError(f"eps={eps:g} and std={std:g} must be positive")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.n_mels = n_mels
        self.f_min = float(f_min)
        self.f_max = f_max
        self.eps = eps
        self.mean = mean
        self.std = std
        device = torch.get_default_device()  # e.g. "meta" inside ``with torch.device("meta")``
        self.register_buffer("window", self._make_window(torch.float32, device), persistent=False)
        self.register_buffer("mel_filters", self._make_filters(torch.float32, device), persistent=False)

    def _make_window(self, dtype: torch.dtype, device: Optional[torch.device]) -> torch.Tensor:
        window = torch.hann_window(self.n_fft, periodic=True, dtype=torch.float64, device="cpu")
        return window.to(device=device, dtype=dtype)  # (n_fft,)

    def _make_filters(self, dtype: torch.dtype, device: Optional[torch.device]) -> torch.Tensor:
        filters = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.f_min, self.f_max)
        return filters.to(device=device, dtype=dtype)  # (n_mels, n_fft // 2 + 1)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args, **kwargs):  # type: ignore[override]
        """As ``nn.Module._apply`` (``.to``, ``.half()``, ``.to_empty``, ...), but the buffers stay
        float32 or float64 and exact: a cast to another dtype rebuilds them in that dtype (float32
        for a lower precision), as does leaving the meta device, on their new device."""
        before = self.window.dtype, self.window.is_meta
        module = super()._apply(fn, *args, **kwargs)
        if self.window.is_meta or (self.window.dtype, False) == before:
            return module
        # a new dtype (rebuilt: a cast of the float32 buffers to float64 would keep float32's rounding;
        # half precision becomes float32), or ``to_empty`` after a build on the meta device
        dtype = self.window.dtype if self.window.dtype in (torch.float32, torch.float64) else torch.float32
        self.window = self._make_window(dtype, self.window.device)
        self.mel_filters = self._make_filters(dtype, self.window.device)
        return module

    def num_frames(self, samples: int) -> int:
        """Frames of ``samples`` samples: ``1 + samples // hop_length``."""
        return 1 + samples // self.hop_length

    def frame_mask(self, lengths: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, frames) bool, True where frame ``t <= lengths[b] // hop_length`` (computed from real audio)."""
        real = 1 + torch.div(lengths.to(torch.int64), self.hop_length, rounding_mode="floor")  # (B,)
        return torch.arange(frames, device=lengths.device)[None, :] < real[:, None]

    def _check(self, waveform: torch.Tensor, lengths: Optional[torch.Tensor], sample_rate: Optional[int]) -> None:
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(
                f"the audio is sampled at {sample_rate} Hz but the spectrogram's sample_rate is {self.sample_rate} Hz: "
                f"resample the audio to {self.sample_rate} Hz first"
            )
        if waveform.dim() != 2:
            hint = {
                1: "add the batch dimension: waveform.unsqueeze(0)",
                3: "the audio must be mono: downmix the channels, e.g. waveform.mean(dim=1)",
            }.get(waveform.dim(), "pass (batch, samples)")
            raise ValueError(f"waveform must be (batch, samples) mono audio; got shape {tuple(waveform.shape)}: {hint}")
        if not waveform.is_floating_point():
            raise ValueError(
                f"waveform must be floating point in [-1, 1]; got {waveform.dtype}: "
                "scale integer PCM, e.g. int16 samples / 32768.0"
            )
        if lengths is not None:
            if lengths.shape != (waveform.shape[0],) or lengths.is_floating_point() or lengths.is_complex():
                raise ValueError(
                    f"lengths must be an integer tensor of shape (batch,) = ({waveform.shape[0]},), the valid samples "
                    f"of each example; got {lengths.dtype} of shape {tuple(lengths.shape)}"
                )
            if not torch.compiler.is_compiling():
                low, high = int(lengths.min()), int(lengths.max())
                if low < 1 or high > waveform.shape[1]:
                    raise ValueError(
                        f"lengths must lie in [1, {waveform.shape[1]}] (the waveform's samples); got min {low}, max {high}"
                    )

    def forward(
        self, waveform: torch.Tensor, lengths: Optional[torch.Tensor] = None, sample_rate: Optional[int] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """waveform (B, S), lengths (B,) valid samples (None: all), ``sample_rate`` of the audio if
        known (checked against the module's) -> (log-mel (B, n_mels, 1 + S // hop_length),
        frame mask (B, frames) bool, True = real frame; None when ``lengths`` is None)."""
        self._check(waveform, lengths, sample_rate)
        dtype = self.mel_filters.dtype
        x = waveform.to(dtype)  # (B, S)
        pad = self.n_fft // 2
        if lengths is None:
            # the standard centred STFT: reflect about the ends of the whole row
            index = reflect_indices(torch.full((x.shape[0],), x.shape[1], device=x.device), x.shape[1], pad)
        else:
            index = reflect_indices(lengths.to(x.device), x.shape[1], pad)  # about each example's own end
        padded = torch.gather(x, 1, index)  # (B, S + 2 * pad)
        spectrum = torch.stft(
            padded, self.n_fft, self.hop_length, window=self.window, center=False, return_complex=True
        )  # (B, n_fft // 2 + 1, frames)
        power = spectrum.real.square() + spectrum.imag.square()  # (B, K, F)
        mel = torch.matmul(self.mel_filters, power)  # (n_mels, K) @ (B, K, F) -> (B, n_mels, F)
        log_mel = (torch.log(mel + self.eps) - self.mean) / self.std  # (B, n_mels, F)
        if lengths is None:
            return log_mel, None
        mask = self.frame_mask(lengths.to(x.device), log_mel.shape[-1])  # (B, F)
        return log_mel.masked_fill(~mask[:, None, :], 0.0), mask
