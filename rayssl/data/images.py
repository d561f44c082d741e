"""Encoded images: checked at sharding time, decoded to fixed-size uint8 arrays for training.

Stored images are 8-bit grayscale (``L``) or ``RGB``. Other modes are converted when sharded:
CMYK/YCbCr/LAB/HSV -> RGB, palette -> RGB, alpha composited onto white, 16-bit and 32-bit
grayscale scaled to 8 bits, 1-bit -> L. Decoding for training resizes the shorter side to the
target size and centre-crops a square (``PIL.ImageOps.fit``); JPEGs are decoded at reduced
scale when they are much larger than the target (``Image.draft``).

Every image opened here is untrusted and bounded (``Limits``): its encoded size and its pixel
count, read from the header before any pixel is decoded. This explicit cap replaces Pillow's
implicit, process-wide one (``Image.MAX_IMAGE_PIXELS``), which is turned off so that it never
refuses first with its own error.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from rayssl.config import DataConfig

FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF")  # MPO: multi-picture JPEG from cameras
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
REENCODE = {"png": ("PNG", {}), "jpeg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}
Image.MAX_IMAGE_PIXELS = None  # replaced by Limits.max_pixels, checked on every open here (_open)


class BadImage(ValueError):
    """An input that is not a decodable image; the message is the reason kept in the manifest."""


@dataclass(frozen=True)
class Limits:
    """Caps on one untrusted encoded image: ``data.max_image_pixels`` and ``data.max_item_bytes``."""

    max_pixels: int = DataConfig.model_fields["max_image_pixels"].default
    max_bytes: int = DataConfig.model_fields["max_item_bytes"].default

    @classmethod
    def of(cls, data_cfg) -> Limits:
        """The caps of a ``DataConfig``."""
        return cls(data_cfg.max_image_pixels, data_cfg.max_item_bytes)


def _check_bytes(data: bytes, limits: Limits, encoded_as: str = "") -> None:
    """``BadImage`` when ``data`` (re-encoded ``encoded_as``, if given) passes ``limits.max_bytes``."""
    if len(data) > limits.max_bytes:
        as_ = f" as {encoded_as}" if encoded_as else ""
        raise BadImage(f"too large: {len(data)} bytes{as_}, over data.max_item_bytes={limits.max_bytes}")


def _open(data: bytes, limits: Limits) -> Image.Image:
    """``data`` opened, its header read and no pixel decoded; ``BadImage`` past either cap."""
    _check_bytes(data, limits)
    im = Image.open(io.BytesIO(data))
    if im.width * im.height > limits.max_pixels:
        im.close()
        raise BadImage(f"too large: {im.width} x {im.height} pixels, "
                       f"over data.max_image_pixels={limits.max_pixels}")
    return im


@dataclass(frozen=True)
class CheckedImage:
    data: bytes          # what goes into the shard: the original bytes unless converted or re-encoded
    width: int
    height: int
    format: str          # of ``data``
    converted: str | None  # e.g. "CMYK -> RGB" when the pixels were changed, else None


def standard(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit ``L`` or ``RGB``."""
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        if a.dtype.kind == "f":
            a = a / max(float(a.max()), 1.0) * 255
        else:
            a = np.clip(a, 0, 65535) / 257  # 16-bit range -> 8 bits
        return Image.fromarray(np.round(a).astype(np.uint8).reshape(im.height, im.width), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out.convert("L") if im.mode in ("LA", "La") else out
    return im.convert("RGB")


def _encode(im: Image.Image, fmt: str) -> bytes:
    name, options = REENCODE[fmt]
    buf = io.BytesIO()
    im.save(buf, name, **options)
    return buf.getvalue()


def check(data: bytes, reencode: str | None = None, limits: Limits = Limits()) -> CheckedImage:
    """Fully decode ``data`` within ``limits``; keep it as is, or convert / re-encode it. Raises ``BadImage``."""
    if not data:
        raise BadImage("empty file")
    try:
        with _open(data, limits) as im:
            if im.format not in FORMATS:
                raise BadImage(f"unsupported format {im.format}")
            im.load()  # a full decode: truncation and corrupt streams fail here
            fmt, mode = im.format, im.mode
            if mode in ("L", "RGB") and reencode is None:
                return CheckedImage(data, im.width, im.height, fmt, None)
            out = standard(im)
            target = reencode or "png"
            encoded = _encode(out, target)
            _check_bytes(encoded, limits, REENCODE[target][0])  # a shard never holds what training refuses
            return CheckedImage(encoded, out.width, out.height, REENCODE[target][0],
                                None if mode in ("L", "RGB") else f"{mode} -> {out.mode}")
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised content)") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as err:
        raise BadImage(f"corrupt image: {err}".splitlines()[0]) from None


def decode(data: bytes, channels: int, size: int, limits: Limits = Limits()) -> np.ndarray:
    """uint8 (size, size, channels): shorter side resized to ``size``, centre square kept;
    ``BadImage`` past ``limits``."""
    with _open(data, limits) as im:
        im.draft("L" if channels == 1 else "RGB", (size, size))
        im = standard(im).convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
        return np.asarray(im).reshape(size, size, channels)


def decode_batch(encoded, channels: int, size: int, limits: Limits = Limits()) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (B, size, size, C), ok bool (B,))``; an undecodable image, or one past
    ``limits``, is zeros, not ok."""
    out = np.zeros((len(encoded), size, size, channels), dtype=np.uint8)
    ok = np.zeros(len(encoded), dtype=bool)
    for i, data in enumerate(encoded):
        try:
            out[i] = decode(data, channels, size, limits)
            ok[i] = True
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError):
            pass
    return out, ok
