"""Image checking (sharding) and decoding (training) on generated files: formats, modes, corruption."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rayssl.data import images

RNG = np.random.default_rng(0)
RGB = Image.fromarray(RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8))


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_supported_formats_kept_byte_for_byte(fmt: str) -> None:
    data = encode(RGB, fmt)
    checked = images.check(data)
    assert checked.data is data and checked.converted is None
    assert (checked.width, checked.height, checked.format) == (60, 40, fmt)


@pytest.mark.parametrize("mode, expected", [("CMYK", "RGB"), ("P", "RGB"), ("RGBA", "RGB"), ("LA", "L")])
def test_odd_modes_converted_to_png(mode: str, expected: str) -> None:
    checked = images.check(encode(RGB.convert(mode), "JPEG" if mode == "CMYK" else "PNG"))
    assert checked.converted == f"{mode} -> {expected}" and checked.format == "PNG"
    assert Image.open(io.BytesIO(checked.data)).mode == expected


def test_sixteen_bit_gray_scaled_to_eight_bits() -> None:
    pixels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    checked = images.check(encode(Image.fromarray(pixels), "PNG"))
    assert checked.converted.endswith("-> L")
    assert np.asarray(Image.open(io.BytesIO(checked.data))).tolist() == [[0, 100, 255]]


def test_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 255))
    rgba.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent
    out = np.asarray(Image.open(io.BytesIO(images.check(encode(rgba, "PNG")).data)))
    assert out[0, 0].tolist() == [10, 20, 30] and out[0, 1].tolist() == [255, 255, 255]


def test_reencode_changes_format() -> None:
    checked = images.check(encode(RGB, "BMP"), reencode="jpeg")
    assert checked.format == "JPEG" and checked.converted is None and len(checked.data) < 7000


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (encode(RGB, "JPEG")[:300], "corrupt image"),
    (encode(RGB, "PNG")[:500], "corrupt image"),
    (b"just some text, not pixels", "not an image"),
    (encode(RGB, "GIF"), "unsupported format GIF"),
])
def test_bad_inputs_raise_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(images.BadImage, match=f"^{reason}"):
        images.check(data)


def test_decode_resizes_shorter_side_and_centre_crops() -> None:
    # A 40 x 60 image whose outer columns differ: the centre crop keeps only the bright band.
    pixels = np.zeros((40, 60), dtype=np.uint8)
    pixels[:, 6:54] = 200  # the centre square after resizing to 20 x 30 is columns 10..50
    out = images.decode(encode(Image.fromarray(pixels), "PNG"), channels=1, size=20)
    assert out.shape == (20, 20, 1) and out.min() >= 190
    rgb = images.decode(encode(Image.fromarray(pixels), "PNG"), channels=3, size=8)
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 1]).all()


def test_decode_batch_marks_failures() -> None:
    batch = [encode(RGB, "JPEG"), b"broken", encode(RGB, "PNG")[:200]]
    out, ok = images.decode_batch(batch, channels=3, size=16)
    assert ok.tolist() == [True, False, False]
    assert out.shape == (3, 16, 16, 3) and out[0].any() and not out[1:].any()
