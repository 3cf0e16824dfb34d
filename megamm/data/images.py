"""Images for the data layer: encoded bytes or PIL images -> square 8-bit RGB arrays -> tensors.

:func:`decode_image` turns the bytes of an image file (``jpg``/``jpeg``/``png``/``webp``, or
anything else Pillow opens) into an ``(S, S, 3)`` uint8 RGB array; :func:`square_rgb` does the
same for an image that is already open (the inference :class:`~megamm.data.processor.Processor`).
Both make the pixels the same way:

1. EXIF orientation (tag 0x0112, values 2-8) is applied, as :func:`PIL.ImageOps.exif_transpose`
   would (a tag of 1, a missing tag or unreadable EXIF leaves the image as stored);
2. the image is centre-cropped to a square (offsets rounded down);
3. it is converted to 8-bit RGB (:func:`_rgb`): alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``,
   ``La``, ``P`` with a transparency entry or an RGBA palette, ``L``/``RGB`` with a PNG
   transparent colour) is composited over a white background; 16-bit grey (``I;16*``) keeps its
   top 8 bits (``v >> 8``); ``I`` (32-bit int) is scaled by its bit depth (a TIFF's
   BitsPerSample, else 16 when every value fits 16 bits, else 32); ``F`` (float) is read on
   Pillow's 0..255 scale unless every finite value lies in [0, 1], which is read as 0..1;
   ``1``, ``L``, ``P``, ``CMYK`` (Pillow inverts Adobe CMYK JPEGs on decode), ``YCbCr`` and the
   rest go through :meth:`PIL.Image.Image.convert`;
4. it is resized to ``S x S`` with bicubic resampling if its side differs.

For an 8-bit RGB image without an orientation tag this is exactly what the loaders did before
(convert, crop, bicubic resize), so those pixels do not change.

:func:`decode_image` also uses JPEG draft mode: the decoder scales the DCT by 1/2, 1/4 or 1/8
(the largest that keeps the short side >= ``S``) before anything else, which is several times
faster for a small ``S`` and a large photo, and differs from a full decode only by the filter
of the downscaling. It refuses (:class:`ImageError`) anything undecodable, truncated (Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False), empty, of zero size, above
:data:`MAX_PIXELS` pixels or refused by Pillow's own decompression-bomb limit, and EPS (whose
decoding runs Ghostscript).

:func:`images_to_tensor` stacks the arrays into the model's ``(B, 3, S, S)`` float input.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import ExifTags, Image, JpegImagePlugin

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Sample keys (file extensions) holding an image, in the order a loader looks for them."""

MAX_PIXELS = 2**28
"""Images with more pixels (width x height, as the header says) are refused before decoding.
Pillow's own limit (``2 * PIL.Image.MAX_IMAGE_PIXELS`` unless that is None) applies as well."""

_REFUSED_FORMATS = frozenset({"EPS"})  # decoding runs an external Ghostscript process
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation -> the transposition that shows the image upright (as ImageOps uses)


class ImageError(ValueError):
    """The bytes (or the image) cannot be made into RGB pixels; the message says why."""


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> (image_size, image_size, 3) uint8 RGB.

    Oriented by EXIF, centre-cropped to a square, converted to RGB (alpha over white) and resized
    with bicubic resampling if needed (see the module docstring); JPEGs are decoded in draft mode,
    scaled in the DCT by 1/2, 1/4 or 1/8: the most that keeps the short side >= ``image_size``.

    Raises:
        ImageError: empty, not an image, undecodable, truncated, of zero size, larger than
            :data:`MAX_PIXELS` (or Pillow's limit), or an EPS file.
        ValueError: ``image_size`` is not a positive integer.
    """
    _check_image_size(image_size)
    if not data:
        raise ImageError("empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width < 1 or height < 1:
                raise ImageError(f"zero size ({width}x{height})")
            if width * height > MAX_PIXELS:
                raise ImageError(f"too large ({width}x{height} > {MAX_PIXELS} pixels): a decompression bomb?")
            if image.format in _REFUSED_FORMATS:
                raise ImageError(f"{image.format} images are not decoded")
            if isinstance(image, JpegImagePlugin.JpegImageFile):  # JPEG, and MPO (camera JPEGs)
                # Scale s in {1, 2, 4, 8} with both sides >= image_size after ceil(side / s),
                # i.e. s <= min(width, height) / image_size: the short side stays >= image_size.
                image.draft("RGB", (image_size, image_size))
            image.load()
            return _square_rgb(image, image_size)
    except (ImageError, MemoryError):
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large: a decompression bomb? ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image Pillow can identify ({len(data)} bytes)") from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"undecodable ({type(err).__name__}: {err})") from None


def square_rgb(image: Image.Image, image_size: int) -> np.ndarray:
    """An open PIL image -> (image_size, image_size, 3) uint8 RGB, made exactly as
    :func:`decode_image` makes it (EXIF orientation, centre crop, RGB with alpha over white,
    bicubic resize), without the draft-mode shortcut.

    Raises:
        ImageError: the image cannot be loaded or converted (e.g. a truncated file behind it).
        ValueError: ``image_size`` is not a positive integer.
    """
    _check_image_size(image_size)
    try:
        return _square_rgb(image, image_size)
    except (ImageError, MemoryError):
        raise
    except Exception as err:
        raise ImageError(f"unusable image ({type(err).__name__}: {err})") from None


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    pixels = torch.from_numpy(images).to(torch.float32)  # (B, H, W, 3)
    return pixels.permute(0, 3, 1, 2).contiguous().div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------------------------
# The steps


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 when absent or unreadable: broken EXIF leaves pixels usable)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) else 1


def _square_rgb(image: Image.Image, image_size: int) -> np.ndarray:
    """Orient, crop, convert, resize: the (image_size, image_size, 3) uint8 pixels."""
    transpose = _TRANSPOSE.get(_orientation(image))
    if transpose is not None:
        image = image.transpose(transpose)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"zero size ({width}x{height})")
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    rgb = _rgb(image)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)  # (S, S, 3)


def _has_alpha(image: Image.Image) -> bool:
    if image.mode in _ALPHA_MODES:
        return True
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"


def _rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> an 8-bit ``RGB`` image (see the module docstring for each mode)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if _has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4) uint8, straight (not premultiplied) alpha
        alpha = rgba[..., 3:].astype(np.uint32)  # (H, W, 1)
        over_white = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255  # round(c a/255 + 255 (1 - a/255))
        return Image.fromarray(over_white.astype(np.uint8), "RGB")
    if mode.startswith("I;16"):
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)  # (H, W): top 8 of 16 bits
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "I":
        return Image.fromarray(_int_to_8bit(image), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_8bit(np.asarray(image, dtype=np.float32)), "L").convert("RGB")
    if mode == "LAB":  # Image.convert copies the channels; colour management maps them to sRGB
        from PIL import ImageCms

        lab_to_srgb = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        return ImageCms.applyTransform(image, lab_to_srgb)
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageError(f"cannot convert mode {mode} to RGB ({err})") from None


def _int_to_8bit(image: Image.Image) -> np.ndarray:
    """Mode ``I`` (H, W) int32 -> (H, W) uint8 by its bit depth: a TIFF's BitsPerSample when it
    says, else 16 bits when all values lie in [0, 65535], else 32 bits (signed: negatives -> 0)."""
    values = np.asarray(image, dtype=np.int64)  # (H, W)
    bits = None
    tags = getattr(image, "tag_v2", None)
    if tags is not None:
        declared = tags.get(258)  # BitsPerSample
        if isinstance(declared, tuple):
            declared = declared[0] if declared else None
        if isinstance(declared, int) and 8 < declared <= 32:
            bits = declared
    if bits is None:
        bits = 16 if values.size == 0 or (values.min() >= 0 and values.max() <= 0xFFFF) else 32
    top = (1 << (31 if bits == 32 else bits)) - 1  # int32 holds 31 magnitude bits
    shift = (31 if bits == 32 else bits) - 8
    return (np.clip(values, 0, top) >> shift).astype(np.uint8)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    """Mode ``F`` (H, W) float32 -> (H, W) uint8: values on Pillow's 0..255 scale, rounded and
    clipped, unless every finite value lies in [0, 1] (then 0..1 -> 0..255); NaN -> 0."""
    finite = np.isfinite(values)
    scale = 1.0
    if finite.any():
        kept = values[finite]
        if kept.min() >= 0.0 and kept.max() <= 1.0:
            scale = 255.0
    scaled = np.where(finite, values * scale, np.where(np.isnan(values), 0.0, values))
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.uint8)
