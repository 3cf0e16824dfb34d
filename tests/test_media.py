"""The decoding layer of the loaders: images (megamm.data.images) and audio clips
(megamm.data.audio.decode_audio and its resampler), against references built here.

Images are made in memory with Pillow and NumPy; the expected pixels come from formulas (``v >> 8``
for 16-bit grey, alpha over white), from NumPy rotations (EXIF orientation), or from Pillow's own
conversion of a known colour (CMYK). Audio is written with the standard library's ``wave`` (integer
PCM of every width, packed here) or soundfile (FLAC, float WAV); the resampler is checked against
an ideal band-limited resampling of a periodic signal computed with NumPy's FFT, and by tone
levels in and beyond its passband.
"""

from __future__ import annotations

import io
import struct
import wave
import zlib

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageFile, JpegImagePlugin

from megamm.data import images as images_module
from megamm.data.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioError,
    WavError,
    audio_info,
    decode_audio,
    decode_wav,
    encode_wav,
    input_frames_needed,
    pcm_to_float,
    resample,
    resampled_length,
    resampling_ratio,
)
from megamm.data.images import IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, decode_image, images_to_tensor, square_rgb

# ----------------------------------------------------------------------------------------------
# Helpers


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def old_square_rgb(image: Image.Image, size: int) -> np.ndarray:
    """The loaders' pixels before this module (convert, centre crop, bicubic resize)."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        rgb = rgb.crop((left, top, left + side, top + side))
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha composited over white, rounded: ``c a / 255 + 255 (1 - a / 255)``."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(rgb.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` RGB, with an empty image stream."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def photo(width: int, height: int, seed: int = 0, noise: float = 3.0) -> np.ndarray:
    """(height, width, 3) uint8: smooth gradients, a few discs and mild noise (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack([x / width * 200 + 20, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * min(width, height)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        image[inside] = rng.uniform(0, 255, 3)
    image += rng.normal(0, noise, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Images: what did not change


def test_constants_and_error_type() -> None:
    assert IMAGE_EXTENSIONS == ("jpg", "jpeg", "png", "webp")
    assert issubclass(ImageError, ValueError)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated images stay errors
    assert MAX_PIXELS == 2**28


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (16, 16), (7, 9), (50, 64)])
def test_rgb_images_match_the_previous_pixels(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    for size in (16, 8, 40):
        expected = old_square_rgb(image, size)
        got = square_rgb(image, size)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        assert np.array_equal(got, expected)
        assert np.array_equal(decode_image(encoded(image, "PNG"), size), expected)
        assert np.array_equal(decode_image(encoded(image, "WEBP", lossless=True), size), expected)


def test_images_to_tensor() -> None:
    images = np.zeros((2, 3, 4, 3), np.uint8)
    images[0, 1, 2] = (0, 255, 51)
    tensor = images_to_tensor(images)
    assert tensor.shape == (2, 3, 3, 4) and tensor.dtype == torch.float32
    assert tensor[0, :, 1, 2].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1.0])
    assert tensor[1].eq(-1.0).all()


# ----------------------------------------------------------------------------------------------
# Images: every mode


def test_grey_and_bilevel() -> None:
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = decode_image(encoded(Image.fromarray(ramp, "L"), "PNG"), 16)
    assert np.array_equal(got, np.repeat(ramp[..., None], 3, axis=-1))
    checker = (np.indices((8, 8)).sum(0) % 2).astype(bool)
    got = decode_image(encoded(Image.fromarray(checker), "PNG"), 8)
    assert np.array_equal(got, np.repeat(np.where(checker, 255, 0)[..., None], 3, -1).astype(np.uint8))


def test_16_bit_grey_keeps_the_top_byte() -> None:
    rng = np.random.default_rng(1)
    values = rng.integers(0, 65536, (12, 12)).astype(np.uint16)
    values.flat[:6] = [0, 255, 256, 32768, 65280, 65535]
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    little = Image.fromarray(values)  # I;16
    assert little.mode == "I;16"
    assert np.array_equal(square_rgb(little, 12), expected)
    png = encoded(little, "PNG")  # a 16-bit grey PNG
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.mode.startswith("I")
    assert np.array_equal(decode_image(png, 12), expected)
    big = Image.frombytes("I;16B", (12, 12), values.astype(">u2").tobytes())
    assert np.array_equal(square_rgb(big, 12), expected)
    assert np.array_equal(square_rgb(Image.fromarray(values.astype(np.int32)), 12), expected)  # I, 16-bit range
    wide = np.array([[0, 1 << 23, (1 << 31) - 1, 1 << 30]], np.int32).repeat(4, 0)  # I beyond 16 bits
    assert square_rgb(Image.fromarray(wide), 4)[0, :, 0].tolist() == [0, 1, 255, 128]


def test_float_images() -> None:
    unit = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    assert np.array_equal(square_rgb(Image.fromarray(unit), 4)[..., 0], np.round(unit * 255).astype(np.uint8))
    bytes_scale = np.array([[0.4, 100.6, 254.5, 300.0], [-5.0, np.nan, np.inf, 17.0]] * 2, np.float32)
    assert square_rgb(Image.fromarray(bytes_scale), 4)[:2, :, 1].tolist() == [[0, 101, 254, 255], [0, 0, 255, 17]]


def test_alpha_is_composited_over_white() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (10, 10), dtype=np.uint8)
    alpha[0, :] = 0
    alpha[1, :] = 255
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    expected = over_white(rgb, alpha)
    assert np.array_equal(expected[0], np.full((10, 3), 255, np.uint8))  # alpha 0: white
    assert np.array_equal(expected[1], rgb[1])  # alpha 255: the colour
    assert np.array_equal(square_rgb(rgba, 10), expected)
    assert np.array_equal(decode_image(encoded(rgba, "PNG"), 10), expected)
    assert np.array_equal(decode_image(encoded(rgba, "WEBP", lossless=True, exact=True), 10), expected)

    grey = rgb[..., 0]
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    assert np.array_equal(decode_image(encoded(la, "PNG"), 10), over_white(np.repeat(grey[..., None], 3, -1), alpha))


def test_palette_images() -> None:
    palette = [255, 0, 0, 0, 128, 0, 10, 20, 30] + [0, 0, 0] * 253
    indices = np.array([[0, 1, 2, 1]] * 4, np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    colours = np.array(palette, np.uint8).reshape(-1, 3)
    assert np.array_equal(decode_image(encoded(image, "PNG"), 4), colours[indices])  # no transparency

    transparent = decode_image(encoded(image, "PNG", transparency=1), 4)  # index 1 is transparent
    expected = colours[indices].copy()
    expected[indices == 1] = 255
    assert np.array_equal(transparent, expected)
    assert np.array_equal(decode_image(encoded(image, "GIF", transparency=1), 4), expected)

    alphas = np.array([255, 0, 100], np.uint8)  # a transparency entry per palette index
    graded = decode_image(encoded(image, "PNG", transparency=bytes(alphas)), 4)
    assert np.array_equal(graded, over_white(colours[indices], alphas[indices]))

    pa = Image.new("PA", (4, 4), (1, 0))  # palette index 1, alpha 0
    pa.putpalette(palette)
    assert square_rgb(pa, 4).tolist() == [[[255, 255, 255]] * 4] * 4


@pytest.mark.parametrize("cmyk", [(0, 255, 255, 0), (255, 0, 0, 0), (0, 0, 0, 128), (40, 90, 200, 30), (0, 0, 0, 0)])
def test_cmyk_jpeg(cmyk: tuple[int, int, int, int]) -> None:
    data = encoded(Image.new("CMYK", (32, 32), cmyk), "JPEG", quality=98)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "CMYK" and "adobe" in opened.info  # an Adobe (inverted) CMYK JPEG
    expected = np.array(Image.new("CMYK", (1, 1), cmyk).convert("RGB").getpixel((0, 0)))
    got = decode_image(data, 16).astype(int)
    assert np.abs(got - expected).max() <= 4, (got[8, 8], expected)


def test_exif_orientation() -> None:
    stored = photo(60, 40, seed=3, noise=0.0)  # (40, 60, 3): wider than tall
    stored[:8, 26:34] = (255, 0, 0)  # a marker at the middle of the stored top edge
    image = Image.fromarray(stored)
    upright_by_tag = {  # the displayed image for each orientation, as NumPy sees it
        1: stored,
        3: np.rot90(stored, 2),
        6: np.rot90(stored, -1),  # rotate 90 degrees clockwise to display
        8: np.rot90(stored, 1),
        2: stored[:, ::-1],
    }
    def expected_of(upright: np.ndarray) -> np.ndarray:
        height, width = upright.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        return upright[top : top + side, left : left + side]

    for tag, upright in upright_by_tag.items():
        exif = Image.Exif()
        exif[0x0112] = tag
        expected = expected_of(upright)
        assert np.array_equal(decode_image(encoded(image, "PNG", exif=exif), 40), expected), tag
        with Image.open(io.BytesIO(encoded(image, "PNG", exif=exif))) as opened:
            assert np.array_equal(square_rgb(opened, 40), expected), tag
        jpeg = decode_image(encoded(image, "JPEG", exif=exif, quality=95), 40).astype(int)
        errors = {other: np.abs(jpeg - expected_of(candidate)).mean() for other, candidate in upright_by_tag.items()}
        assert min(errors, key=errors.get) == tag and errors[tag] < 8, (tag, errors)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(encoded(image, "PNG", exif=exif), 40)
    assert rotated[16:24, -8:].tolist() == [[[255, 0, 0]] * 8] * 8  # turned clockwise: at the right edge


def test_jpeg_draft_mode_matches_a_full_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(Image.fromarray(photo(2000, 1500, seed=4)), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as opened:
        full = old_square_rgb(opened, 224)  # no draft
    drafted_sizes = []
    jpeg_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # records the size the decoder will produce
        result = jpeg_draft(self, mode, size)
        drafted_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    got = decode_image(data, 224)
    assert drafted_sizes == [(500, 375)]  # 1/4 scale: the short side 375 >= 224 (1/8 would be 188)
    error = np.abs(got.astype(int) - full.astype(int))
    assert error.mean() < 1.5 and np.percentile(error, 99) < 16, (error.mean(), np.percentile(error, 99))

    tall = encoded(Image.fromarray(photo(300, 1800, seed=5)), "JPEG")  # aspect 6: short side decides
    drafted_sizes.clear()
    assert decode_image(tall, 128).shape == (128, 128, 3)
    assert drafted_sizes == [(150, 900)]  # 1/2 scale: 150 >= 128 (1/4 would give 75)

    first = Image.fromarray(photo(1000, 800, seed=6))
    mpo = encoded(first, "MPO", save_all=True, append_images=[first])  # a camera's multi-picture JPEG
    drafted_sizes.clear()
    assert decode_image(mpo, 224).shape == (224, 224, 3) and drafted_sizes == [(500, 400)]


# ----------------------------------------------------------------------------------------------
# Images: refusals


def test_broken_images_raise_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    jpeg = encoded(Image.fromarray(photo(200, 150)), "JPEG")
    png = encoded(Image.fromarray(photo(64, 48)), "PNG")
    cases = {
        "empty": b"",
        "not an image": b"certainly not an image" * 10,
        "undecodable|truncated": jpeg[: len(jpeg) // 2],
        "undecodable|truncated ": jpeg[:-2],  # only the end-of-image marker is missing
        " undecodable|truncated": png[: len(png) - 100],
        "not an image ": png_header_only(0, 10),  # zero width
        "decompression bomb": png_header_only(100_000, 100_000),
        " not an image": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
    }
    for reason, data in cases.items():
        with pytest.raises(ImageError, match=reason.strip()):
            decode_image(data, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own check off: ours still holds
    with pytest.raises(ImageError, match="too large"):
        decode_image(png_header_only(20_000, 20_000), 32)
    monkeypatch.setattr(images_module, "MAX_PIXELS", 64 * 48 - 1)
    with pytest.raises(ImageError, match="too large"):
        decode_image(png, 32)
    with pytest.raises(ValueError, match="image_size"):
        decode_image(png, 0)


# ----------------------------------------------------------------------------------------------
# Audio helpers


def pcm_wav(values: np.ndarray, rate: int, width: int) -> bytes:
    """(N, C) integers -> a PCM WAV of ``width`` bytes per sample, packed here (8-bit unsigned)."""
    values = np.asarray(values, np.int64)
    values = values[:, None] if values.ndim == 1 else values  # (N, C)
    if width == 1:
        raw = (values + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = (values.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]).tobytes()
    else:
        raw = values.astype(f"<i{width}").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(values.shape[1])
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(raw)
    return buffer.getvalue()


def sound_file(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def tone(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency * np.arange(int(round(rate * seconds))) / rate)


def fft_resample(x: np.ndarray, samples: int) -> np.ndarray:
    """The ideal band-limited resampling of one period of a periodic signal to ``samples``."""
    spectrum = np.fft.rfft(x)[: samples // 2 + 1] * (samples / len(x))
    return np.fft.irfft(spectrum, samples)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


EDGE = 200  # output samples at each end that the zero padding outside the clip may touch


# ----------------------------------------------------------------------------------------------
# Audio: reading


def test_audio_constants_and_errors() -> None:
    assert AUDIO_EXTENSIONS == ("flac", "wav")
    assert issubclass(AudioError, ValueError) and issubclass(WavError, AudioError)


def test_demo_wav_decodes_exactly_as_before() -> None:
    pcm = np.random.default_rng(0).integers(-32768, 32768, 5000).astype(np.int16)
    pcm[:3] = [-32768, 0, 32767]
    data = encode_wav(pcm)
    got = decode_audio(data, "wav")
    assert got.dtype == np.float32 and np.array_equal(got, pcm_to_float(decode_wav(data)))
    assert np.array_equal(decode_audio(data, "wav", max_samples=1234), pcm_to_float(pcm[:1234]))
    assert audio_info(data, "wav") == audio_info(data, ".WAV")
    info = audio_info(data, "wav")
    assert (info.sample_rate, info.channels, info.frames) == (SAMPLE_RATE, 1, 5000)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_pcm_wav_of_every_width(width: int) -> None:
    bits = 8 * width
    rng = np.random.default_rng(width)
    values = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (300, 2))
    values[:2] = [[-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], [0, 1]]
    data = pcm_wav(values, SAMPLE_RATE, width)
    expected = (values[:, 0] + values[:, 1]) / 2 / 2 ** (bits - 1)
    got = decode_audio(data, "wav")
    assert got.shape == (300,)
    assert np.abs(got - expected).max() <= 2**-23  # exact up to float32
    if width <= 3:
        assert np.array_equal(got, expected.astype(np.float32))
    subtype = "PCM_U8" if width == 1 else f"PCM_{bits}"
    extensible = sound_file(values[:, :1] / 2 ** (bits - 1), SAMPLE_RATE, "WAVEX", subtype)  # WAVE_FORMAT_EXTENSIBLE
    assert np.abs(decode_audio(extensible, "wav") - values[:, 0] / 2 ** (bits - 1)).max() <= 2**-23


def test_mono_mixdown_of_opposite_channels_is_silence() -> None:
    x = np.random.default_rng(3).integers(-32767, 32768, 4000)
    stereo = np.stack([x, -x], axis=1)
    assert not decode_audio(pcm_wav(stereo, SAMPLE_RATE, 2), "wav").any()
    assert not decode_audio(pcm_wav(stereo, 44_100, 2), "wav").any()
    flac = sound_file(stereo / 32768.0, 44_100, "FLAC", "PCM_16")
    assert not decode_audio(flac, "flac").any()


def test_flac_without_a_length_is_refused_and_the_bytes_decide_the_format() -> None:
    x = np.random.default_rng(4).uniform(-0.5, 0.5, 5000)
    flac = bytearray(sound_file(x, SAMPLE_RATE, "FLAC", "PCM_16"))
    expected = np.round(x * 32767) / 32768  # what 16-bit FLAC stores, as read back
    assert np.abs(decode_audio(bytes(flac), "flac") - expected).max() < 1e-4
    assert audio_info(bytes(flac), "flac").frames == 5000
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0  # STREAMINFO first: its body starts at byte 8
    flac[8 + 13] &= 0xF0  # the 36-bit total sample count: 0 (unknown, as a streaming encoder writes)
    flac[8 + 14 : 8 + 18] = bytes(4)
    for max_samples in (None, 100):
        with pytest.raises(AudioError, match="no sample count"):
            decode_audio(bytes(flac), "flac", max_samples=max_samples)
    wav = pcm_wav(np.round(x * 32767).astype(np.int64), SAMPLE_RATE, 2)
    assert np.array_equal(decode_audio(wav, "flac"), decode_audio(wav, "wav"))  # the bytes decide


def test_float_wav_is_clipped_and_checked() -> None:
    x = np.array([0.25, -0.5, 1.5, -3.0] * 100, np.float32)
    got = decode_audio(sound_file(x, SAMPLE_RATE, "WAV", "FLOAT"), "wav")
    assert np.array_equal(got, np.clip(x, -1, 1))
    x[17] = np.nan
    with pytest.raises(AudioError, match="non-finite"):
        decode_audio(sound_file(x, SAMPLE_RATE, "WAV", "FLOAT"), "wav")


# ----------------------------------------------------------------------------------------------
# Audio: resampling


def test_sine_44k_stereo_flac_and_48k_24_bit_wav_to_16k() -> None:
    sine44 = tone(440.0, 44_100, 1.0)
    flac = sound_file(np.stack([sine44, sine44], 1), 44_100, "FLAC", "PCM_16")
    sine48 = tone(440.0, 48_000, 1.0)
    wav24 = pcm_wav(np.round(sine48 * 2**23).astype(np.int64), 48_000, 3)
    for data, ext in ((flac, "flac"), (wav24, "wav")):
        got = decode_audio(data, ext)
        assert got.shape == (SAMPLE_RATE,)
        assert peak_hz(got, SAMPLE_RATE) == pytest.approx(440.0, abs=0.5)
        assert rms(got[EDGE:-EDGE]) == pytest.approx(rms(sine44), rel=0.01)
        reference = tone(440.0, SAMPLE_RATE, 1.0)
        assert np.abs(got - reference)[EDGE:-EDGE].max() < 2e-3


def band_limited(rate: int, top_hz: int, seed: int) -> np.ndarray:
    """One second at ``rate`` of random-phase noise on the integer frequencies 20 Hz..``top_hz``
    (so it is periodic in the second), peaking at 0.3."""
    rng = np.random.default_rng(seed)
    spectrum = np.zeros(rate // 2 + 1, complex)
    bins = np.arange(20, top_hz)
    spectrum[bins] = rng.normal(size=len(bins)) * np.exp(2j * np.pi * rng.uniform(size=len(bins)))
    signal = np.fft.irfft(spectrum, rate)
    return signal * (0.3 / np.abs(signal).max())


@pytest.mark.parametrize(
    "src, dst, top_hz",  # content up to 7/8 of the lower Nyquist frequency: the passband
    [(44_100, 16_000, 7000), (48_000, 16_000, 7000), (44_100, 22_050, 9600), (44_100, 48_000, 19_000),
     (8000, 16_000, 3500), (16_000, 44_100, 7000), (11_025, 48_000, 4800)],
)
def test_resampling_matches_an_ideal_band_limited_reference(src: int, dst: int, top_hz: int) -> None:
    x = band_limited(src, top_hz, seed=src + dst)
    expected = fft_resample(x, dst)
    got = resample(x.astype(np.float32), src, dst)
    assert got.shape == (dst,) and got.dtype == np.float32
    error = np.abs(got - expected)[EDGE * 3 : -EDGE * 3]
    assert error.max() < 3e-4 and rms(error) < 5e-5, (error.max(), rms(error))  # of a 0.3 peak
    if src == 44_100 and dst == SAMPLE_RATE:  # the same through a 24-bit FLAC
        error = np.abs(decode_audio(sound_file(x, src, "FLAC", "PCM_24"), "flac") - expected)[EDGE * 3 : -EDGE * 3]
        assert error.max() < 3e-4


def test_odd_rates_use_a_small_nearby_ratio() -> None:
    assert resampling_ratio(44_100, 16_000) == (160, 441) and resampling_ratio(16_000, 11_025) == (441, 640)
    assert resampling_ratio(44_101, 16_000) == (119, 328)  # 16000/44101 has terms over 1000
    assert resampled_length(44_101, 44_101, 16_000) == 16_001  # ceil(44101 * 119 / 328)
    x = band_limited(44_101, 7000, seed=7)  # one second of integer-Hz noise at 44,101 Hz
    got = resample(x, 44_101, 16_000)
    assert len(got) == 16_001
    times = np.arange(8000, 8400) * 328 / 119  # output n sits at input time n * 328 / 119
    spectrum = np.fft.rfft(x)[:7000]  # x is the Fourier series of its spectrum, read at those times
    series = np.exp(2j * np.pi * np.outer(times, np.arange(7000)) / 44_101) @ spectrum  # (400,)
    expected = (2 * series.real - spectrum[0].real) / 44_101
    assert np.abs(got[8000:8400] - expected).max() < 3e-4
    with pytest.raises(ValueError, match="1000:1"):
        resample(x, 16_000_001, 16_000)
    with pytest.raises(AudioError, match="implausible sample rate"):
        decode_audio(pcm_wav(np.zeros(100, np.int64), 500, 2), "wav")


def test_anti_aliasing() -> None:
    kept = decode_audio(sound_file(tone(7000.0, 44_100, 0.5), 44_100, "WAV", "FLOAT"), "wav")
    assert rms(kept[EDGE:-EDGE]) == pytest.approx(rms(tone(7000.0, 44_100, 0.5)), rel=0.01)
    assert peak_hz(kept, SAMPLE_RATE) == pytest.approx(7000.0, abs=2.0)
    aliased = decode_audio(sound_file(tone(12_000.0, 44_100, 0.5), 44_100, "WAV", "FLOAT"), "wav")
    assert 20 * np.log10(rms(aliased[EDGE:-EDGE]) / rms(tone(12_000.0, 44_100, 0.5))) < -40.0
    assert np.allclose(resample(np.ones(2000, np.float32), 44_100, 16_000)[EDGE:-EDGE], 1.0, atol=1e-6)  # DC


def test_max_samples_cuts_exactly_and_decodes_only_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    noise = np.random.default_rng(6).uniform(-0.5, 0.5, (48_000, 2))
    flac = sound_file(noise, 44_100, "FLAC", "PCM_16")
    full = decode_audio(flac, "flac")
    assert len(full) == -(-48_000 * 16_000 // 44_100)
    for cut in (1, 100, 5000, len(full) - 1, len(full), len(full) + 10):
        got = decode_audio(flac, "flac", max_samples=cut)
        assert len(got) == min(cut, len(full))
        assert np.allclose(got, full[:cut], atol=1e-6, rtol=0)

    wav48 = pcm_wav(np.round(noise * 32767).astype(np.int64), 48_000, 2)
    requested = []
    readframes = wave.Wave_read.readframes
    monkeypatch.setattr(wave.Wave_read, "readframes", lambda self, n: requested.append(n) or readframes(self, n))
    got = decode_audio(wav48, "wav", max_samples=1600)
    assert len(got) == 1600 and requested == [input_frames_needed(1600, 48_000, 16_000)]
    assert 3 * 1600 < requested[0] < 3 * 1600 + 60  # a filter's reach beyond the last output
    assert np.allclose(got, decode_audio(wav48, "wav")[:1600], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Audio: refusals


def test_broken_audio_raises_audio_error() -> None:
    pcm = pcm_wav(np.round(tone(440.0, 44_100, 0.5) * 32767).astype(np.int64), 44_100, 2)
    floats = sound_file(tone(440.0, 44_100, 0.5), 44_100, "WAV", "FLOAT")
    flac = sound_file(tone(440.0, 44_100, 2.0), 44_100, "FLAC", "PCM_16")
    cases = {
        "empty": (b"", "wav"),
        "undecodable": (b"this is no audio file at all" * 10, "flac"),
        "data chunk|undecodable": (b"RIFF\x10\x00\x00\x00WAVEfmt garbage!", "wav"),
        "truncated": (pcm[: len(pcm) - 1001], "wav"),
        "truncated ": (floats[: len(floats) - 1001], "wav"),
        "truncated|undecodable": (flac[: len(flac) // 2], "flac"),
        "no samples": (pcm_wav(np.zeros((0, 1), np.int64), 16_000, 2), "wav"),
        "data chunk": (pcm[:40], "wav"),  # cut inside the header
    }
    for reason, (data, ext) in cases.items():
        with pytest.raises(AudioError, match=reason.strip()):
            decode_audio(data, ext)
    with pytest.raises(AudioError, match="truncated|undecodable"):  # the undecoded rest must be there
        decode_audio(flac[: len(flac) // 2], "flac", max_samples=100)
    with pytest.raises(AudioError, match="truncated"):
        audio_info(pcm[:-10], "wav")
    with pytest.raises(ValueError, match="extension"):
        decode_audio(pcm, "mp3")
    with pytest.raises(ValueError, match="max_samples"):
        decode_audio(pcm, "wav", max_samples=0)
