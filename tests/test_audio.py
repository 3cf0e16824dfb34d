"""The audio encoder: log-mel spectrogram (against a NumPy reference written here from the formulas),
padding rules, AST-style patch embedding, the encoder, and its TP=2 / sequence-parallel parity.

The NumPy reference is independent of the module's code: its mel scale is written as
``3 f / 200`` below 1 kHz and ``15 + 27 log_6.4(f / 1000)`` above (the module: exp/log with a
precomputed step), its triangles come from ``np.interp`` (the module: min of two ramps), and its
frames are sliced out of ``np.pad(mode="reflect")`` (the module: a gather and ``torch.stft``).
"""

from __future__ import annotations

import math
import traceback

import numpy as np
import pytest
import torch

from megamm.model.encoders import AudioEncoder, AudioPatchEmbedding, LogMelSpectrogram
from megamm.model.encoders.melspec import hz_to_mel, mel_filterbank, mel_frequencies, mel_to_hz
from megamm.model.init import WeightInit
from megamm.parallel import ParallelState, shard_of
from tests.distributed import run_distributed

SR = 16000
# (n_fft, hop_length, n_mels, f_min, f_max): the default (AST/Whisper-v3-like) and another
SETTINGS = [(400, 160, 128, 0.0, 8000.0), (512, 128, 40, 50.0, 7600.0)]
EPS = 1e-6


# --------------------------------------------------------------------------------------------
# NumPy reference


def np_hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + 27.0 * np.log(np.maximum(hz, 1e-9) / 1000.0) / np.log(6.4))


def np_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * 6.4 ** ((mel - 15.0) / 27.0))


def np_filterbank(n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1): triangles over np.interp, each scaled to area 1 (in Hz)."""
    edges = np_mel_to_hz(np.linspace(np_hz_to_mel(f_min), np_hz_to_mel(f_max), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / SR)
    return np.stack(
        [np.interp(freqs, edges[i : i + 3], [0.0, 1.0, 0.0]) * 2.0 / (edges[i + 2] - edges[i]) for i in range(n_mels)]
    )


def np_log_mel(x: np.ndarray, n_fft: int, hop: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_mels, 1 + len(x) // hop): log(mel power of periodic-Hann frames of the reflect-padded x + eps)."""
    padded = np.pad(np.asarray(x, dtype=np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    frames = np.stack([padded[t * hop : t * hop + n_fft] for t in range(1 + len(x) // hop)])  # (F, n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (F, K)
    return np.log(np_filterbank(n_fft, n_mels, f_min, f_max) @ power.T + EPS)


def _chirp(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return 0.5 * np.sin(2 * np.pi * (100.0 * t + (7000.0 - 100.0) * t**2 / (2 * seconds)))


def _noise(samples: int = SR, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, samples)


def _spectrogram(setting: tuple) -> LogMelSpectrogram:
    n_fft, hop, n_mels, f_min, f_max = setting
    return LogMelSpectrogram(SR, n_fft, hop, n_mels, f_min, f_max, eps=EPS)


# --------------------------------------------------------------------------------------------
# LogMelSpectrogram against the reference


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"nfft{s[0]}-hop{s[1]}-mels{s[2]}")
def test_log_mel_equals_numpy_reference(setting: tuple) -> None:
    module = _spectrogram(setting)
    for name, signal in (("chirp", _chirp()), ("noise", _noise())):
        expected = np_log_mel(signal, *setting)
        wave = torch.from_numpy(signal)[None]
        got64, mask = module.double()(wave)
        assert mask is None and got64.dtype == torch.float64
        assert got64.shape == (1, setting[2], 1 + len(signal) // setting[1])
        np.testing.assert_allclose(got64[0].numpy(), expected, rtol=0, atol=1e-9, err_msg=f"{name}, float64")
        # float32 (the default): the chirp's quiet bands near the eps floor carry float32's rounding
        got32, _ = module.float()(wave.float())
        assert got32.dtype == torch.float32
        np.testing.assert_allclose(got32[0].double().numpy(), expected, rtol=0, atol=1e-3, err_msg=f"{name}, float32")


def test_log_mel_matches_torch_stft_centered() -> None:
    """Unpadded audio: the module's reflect padding is ``torch.stft(center=True, pad_mode="reflect")``."""
    module = LogMelSpectrogram().double()
    wave = torch.from_numpy(_noise(4000))[None]
    spec = torch.stft(wave, 400, 160, window=torch.hann_window(400, dtype=torch.float64), center=True,
                      pad_mode="reflect", return_complex=True)  # fmt: skip
    expected = torch.log(module.mel_filters @ spec.abs().square() + EPS)
    torch.testing.assert_close(module(wave)[0], expected, rtol=0, atol=1e-10)


def test_filterbank_properties() -> None:
    n_fft, n_mels, f_min, f_max = 400, 40, 0.0, 8000.0
    bank = mel_filterbank(SR, n_fft, n_mels, f_min, f_max).numpy()
    edges = mel_frequencies(n_mels, f_min, f_max).numpy()
    freqs = np.arange(n_fft // 2 + 1) * SR / n_fft
    assert bank.shape == (n_mels, n_fft // 2 + 1) and (bank >= 0).all()
    np.testing.assert_allclose(bank, np_filterbank(n_fft, n_mels, f_min, f_max), rtol=0, atol=1e-12)
    # the Slaney scale by hand: 3 mels per 200 Hz to 1 kHz = 15 mels, then 27 mels per factor 6.4
    hz = torch.tensor([0.0, 200.0, 1000.0, 6400.0, 1000 * 6.4**2], dtype=torch.float64)
    torch.testing.assert_close(hz_to_mel(hz), torch.tensor([0.0, 3.0, 15.0, 42.0, 69.0], dtype=torch.float64))
    torch.testing.assert_close(mel_to_hz(hz_to_mel(hz)), hz)
    np.testing.assert_allclose(np.diff(np_hz_to_mel(edges)), (np_hz_to_mel(f_max) - np_hz_to_mel(f_min)) / (n_mels + 1))
    for i in range(n_mels):
        lo, centre, hi = edges[i : i + 3]
        height = 2.0 / (hi - lo)  # area normalisation: a triangle of base hi - lo and area 1
        # the peak: at a bin next to the centre, never above the triangle's height
        assert int(bank[i].argmax()) in (math.floor(centre * n_fft / SR), math.ceil(centre * n_fft / SR)), i
        assert bank[i].max() <= height * (1 + 1e-12)
        assert (bank[i][(freqs <= lo) | (freqs >= hi)] == 0).all() and (bank[i][(freqs > lo) & (freqs < hi)] > 0).all()
    # the band is covered: every bin strictly inside (f_min, f_max) is in a filter; between the first
    # and the last centre the unnormalised triangles sum to one
    inside = (freqs > f_min) & (freqs < f_max)
    assert (bank[:, inside].sum(axis=0) > 0).all() and (bank[:, ~inside] == 0).all()
    unnormalised = bank * ((edges[2:] - edges[:-2]) / 2.0)[:, None]
    middle = (freqs >= edges[1]) & (freqs <= edges[-2])
    np.testing.assert_allclose(unnormalised[:, middle].sum(axis=0), 1.0, atol=1e-12)


@pytest.mark.parametrize("setting", [(400, 160, 64, 0.0, 8000.0), SETTINGS[1], SETTINGS[0]], ids=["mels64", "mels40", "mels128"])
def test_pure_tone_peaks_in_nearest_mel_band(setting: tuple) -> None:
    """A tone peaks in the band whose centre is nearest, for tones not near the midpoint of two
    centres (there, the narrower and taller lower triangle of the log region may win). The filters
    must be at least one FFT bin apart: at n_fft 400 (40 Hz bins) 128 Slaney mels are closer below
    ~1.7 kHz, where a tone can peak one band off, so that setting is checked above 1.7 kHz."""
    module = _spectrogram(setting)
    centres = mel_frequencies(setting[2], setting[3], setting[4]).numpy()[1:-1]
    low = 1700.0 if setting[2] == 128 else centres[0]
    tones = np.linspace(low, centres[-1], 150)
    nearest = np.abs(centres[None, :] - tones[:, None]).argmin(axis=1)
    gaps = np.abs(np.diff(centres))
    second = np.minimum(np.r_[np.inf, gaps][nearest], np.r_[gaps, np.inf][nearest])  # gap to the nearer neighbour
    clear = np.abs(tones - centres[nearest]) < 0.4 * second  # within 80% of the half-gap
    assert clear.sum() > 80
    waves = np.sin(2 * np.pi * tones[clear, None] * np.arange(3200) / SR)  # (N, S)
    log_mel, _ = module(torch.from_numpy(waves).float())
    peaks = log_mel[:, :, 3:-3].mean(dim=-1).argmax(dim=-1).numpy()  # interior frames
    np.testing.assert_array_equal(peaks, nearest[clear], err_msg=f"tones {tones[clear]}")


def test_buffers_not_parameters_and_kept_exact() -> None:
    module = LogMelSpectrogram()
    assert list(module.parameters()) == [] and list(module.state_dict()) == []
    assert {name for name, _ in module.named_buffers()} == {"window", "mel_filters"}
    exact = mel_filterbank(SR, 400, 128)
    # half precision keeps float32 buffers, float64 rebuilds them exactly (not float32's rounding)
    assert module.bfloat16().mel_filters.dtype == torch.float32
    torch.testing.assert_close(module.double().mel_filters, exact, rtol=0, atol=0)
    with torch.device("meta"):
        meta = LogMelSpectrogram()
    assert meta.mel_filters.is_meta
    meta.to_empty(device="cpu")  # uninitialised memory, rebuilt
    torch.testing.assert_close(meta.mel_filters, exact.float(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Padded audio


def test_padded_batch_frames_equal_each_waveform_alone() -> None:
    """The rule: frame t of example b is real iff t <= lengths[b] // hop, and then equals that frame
    of waveform[b, :lengths[b]] alone (reflect padding about the example's own end: no boundary
    effect, whatever the padding holds); the other frames are 0."""
    module = LogMelSpectrogram(n_mels=40).double()
    long_, short, tiny = _noise(4800, 1), _noise(3000, 2), _noise(150, 3)  # 3000 = 18 * 160 + 120; 150 < n_fft / 2
    batch = np.stack([long_, np.r_[short, _noise(1800, 4) * 50], np.r_[tiny, np.ones(4650)]])  # garbage padding
    lengths = torch.tensor([4800, 3000, 150])
    log_mel, mask = module(torch.from_numpy(batch), lengths)
    assert log_mel.shape == (3, 40, 31)
    real = [31, 19, 1]  # 1 + lengths // 160
    np.testing.assert_array_equal(mask.numpy(), np.arange(31)[None, :] < np.array(real)[:, None])
    for row, (signal, frames) in enumerate(zip((long_, short, tiny), real)):
        alone, _ = module(torch.from_numpy(signal)[None])
        assert alone.shape[-1] == frames
        torch.testing.assert_close(log_mel[row, :, :frames], alone[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(log_mel[row, :, :frames].numpy(), np_log_mel(signal, 400, 160, 40, 0.0, 8000.0), atol=1e-9)
        assert (log_mel[row, :, frames:] == 0).all()


def test_patch_mask_follows_frame_mask() -> None:
    """A patch is real when any of its frames is; the class token always is."""
    embedding = AudioPatchEmbedding(16, 64, (4, 4), 8, WeightInit())
    frame_mask = torch.arange(31)[None, :] < torch.tensor([[31], [19], [16], [1]])
    mask = embedding.patch_mask(frame_mask)
    assert mask.shape == (4, 1 + 8 * 4)  # 31 frames -> 8 time patches (the last partly padding) x 4 frequency patches
    time_patches = torch.tensor([8, 5, 4, 1])  # ceil(real frames / 4)
    expected = torch.cat([torch.ones(4, 1, dtype=torch.bool), (torch.arange(32)[None, :] // 4) < time_patches[:, None]], dim=1)
    assert torch.equal(mask, expected)
    assert embedding.num_tokens(31) == 33


# --------------------------------------------------------------------------------------------
# The encoder

TINY = dict(n_mels=16, max_frames=40, patch_size=(4, 4), hidden_size=16, num_layers=2, num_heads=2, ffn_size=32)


def _encoder(group=None, sequence_parallel: bool = False, **overrides) -> AudioEncoder:
    sizes = {**TINY, **overrides}
    return AudioEncoder(**sizes, group=group, init=WeightInit(seed=5), sequence_parallel=sequence_parallel)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two clips, the first 3000 samples then garbage padding, the second 4800 (31 frames)."""
    generator = torch.Generator().manual_seed(3)
    waveform = 0.1 * torch.randn(2, 4800, generator=generator)
    return waveform, torch.tensor([3000, 4800])


def test_encoder_shape_gradients_and_padding_invariance() -> None:
    encoder = _encoder()
    encoder.train()  # dropout 0: deterministic
    waveform, lengths = _batch()
    waveform.requires_grad_(True)
    out = encoder(waveform, lengths)
    assert out.shape == (2, 16)
    (out * torch.randn_like(out)).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert waveform.grad[0, :3000].abs().sum() > 0 and (waveform.grad[0, 3000:] == 0).all(), "padding is read"
    # the clip alone, without padding or the other clip, pools to the same features
    alone = encoder(waveform[:1, :3000].detach())
    torch.testing.assert_close(alone[0], out[0].detach(), rtol=1e-5, atol=1e-6)
    # and with more padding (6080 samples: 39 frames, within max_frames=40)
    longer = torch.cat([waveform.detach(), torch.randn(2, 1280)], dim=1)
    torch.testing.assert_close(encoder(longer, lengths), out.detach(), rtol=1e-5, atol=1e-6)


def _own_shard(param: torch.nn.Parameter, full: torch.Tensor, state: ParallelState) -> torch.Tensor:
    if getattr(param, "tensor_model_parallel", False):
        return shard_of(full, state.tp_rank, state.tp_size, param.partition_dim, param.partition_stride)
    return full


def _run(encoder: AudioEncoder, waveform: torch.Tensor, lengths) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad(set_to_none=True)
    out = encoder(waveform, lengths)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in encoder.named_parameters()}


def _tensor_parallel_parity(rank: int, world: int) -> None:
    state = ParallelState.initialize(tensor_parallel=world)
    waveform, lengths = _batch()
    failures = []
    for given in (lengths, None):  # with a frame mask, and without (the sequence-parallel padding mask only)
        expected, expected_grads = _run(_encoder(), waveform, given)
        for sp in (False, True):
            encoder = _encoder(state.tp_group, sp)
            assert encoder.embedding.layout.active == sp
            try:
                out, grads = _run(encoder, waveform, given)
                torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)
                params = dict(encoder.named_parameters())
                for name, grad in grads.items():
                    want = _own_shard(params[name], expected_grads[name], state)
                    torch.testing.assert_close(grad, want, rtol=1e-4, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
            except Exception:  # noqa: BLE001 - report every failing case
                failures.append(f"[rank {rank}] sequence_parallel={sp}, lengths={given}:\n{traceback.format_exc()}")
    if failures:
        raise AssertionError("\n".join(failures))


def test_encoder_tp2_equals_tp1_with_and_without_sequence_parallel(tmp_path) -> None:
    """33 tokens (1 + 8 time x 4 frequency patches): odd, so sequence parallelism pads them."""
    run_distributed(_tensor_parallel_parity, 2, tmp_path)


# --------------------------------------------------------------------------------------------
# Errors


def test_spectrogram_errors_name_the_argument_and_the_fix() -> None:
    spec = LogMelSpectrogram()
    with pytest.raises(ValueError, match="sampled at 44100 Hz but the spectrogram's sample_rate is 16000 Hz: resample"):
        spec(torch.zeros(1, 1000), sample_rate=44100)
    spec(torch.zeros(1, 1000), sample_rate=16000)
    with pytest.raises(ValueError, match=r"sample_rate=16000.0 must be a positive integer"):
        LogMelSpectrogram(sample_rate=16000.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="f_max <= sample_rate / 2 = 4000 Hz; got f_min=0, f_max=8000"):
        LogMelSpectrogram(sample_rate=8000, f_max=8000.0)
    with pytest.raises(ValueError, match=r"got shape \(1000,\): add the batch dimension"):
        spec(torch.zeros(1000))
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 1000\): the audio must be mono"):
        spec(torch.zeros(2, 2, 1000))
    with pytest.raises(ValueError, match="got torch.int16: scale integer PCM"):
        spec(torch.zeros(1, 1000, dtype=torch.int16))
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \(batch,\) = \(2,\)"):
        spec(torch.zeros(2, 1000), torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 1000\].*max 1001"):
        spec(torch.zeros(2, 1000), torch.tensor([1000, 1001]))
    with pytest.raises(ValueError, match="lengths must lie in"):
        spec(torch.zeros(2, 1000), torch.tensor([0, 1000]))


def test_encoder_errors_name_the_argument_and_the_fix() -> None:
    encoder = _encoder()
    with pytest.raises(ValueError, match=r"6400 samples gives 41 frames, more than max_frames=40 \(6399 samples"):
        encoder(torch.zeros(1, 6400))
    encoder(torch.zeros(1, 6399))  # the longest
    with pytest.raises(ValueError, match="resample"):
        encoder(torch.zeros(1, 1000), sample_rate=8000)
    with pytest.raises(ValueError, match="more than max_frames=40"):
        encoder.embedding(torch.zeros(1, 16, 41))
    with pytest.raises(ValueError, match=r"n_mels=16, frames\); got shape \(1, 40, 20\)"):
        encoder.embedding(torch.zeros(1, 40, 20))
    with pytest.raises(ValueError, match="n_mels=128 is not a multiple of the patch's frequency size 12"):
        AudioPatchEmbedding(128, 1024, 12, 8, WeightInit())
    with pytest.raises(ValueError, match=r"patch_size=\(16, 0\)"):
        AudioPatchEmbedding(128, 1024, (16, 0), 8, WeightInit())
