"""Image checking (sharding) and decoding (training) on generated files: formats, modes, corruption."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayssl.data import images

ROOT = Path(__file__).resolve().parents[1]
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


def test_decode_resizes_shorter_side_and_center_crops() -> None:
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


def _photo_set():
    """benchmarks/photo_set.py, whose bad inputs (and 16-bit PNG writer) these tests share."""
    spec = importlib.util.spec_from_file_location("photo_set", ROOT / "benchmarks" / "photo_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOOTH = Image.fromarray(np.stack([*np.meshgrid(np.linspace(0, 255, 64), np.linspace(40, 200, 48)),
                                   np.full((48, 64), 90.0)], -1).astype(np.uint8))


def test_valid_cmyk_jpeg_and_16_bit_png_decode_to_rgb_uint8() -> None:
    """A CMYK JPEG (print workflows) and a 16-bit RGB PNG (raw converters) are valid images:
    they decode to the same RGB uint8 pixels as their 8-bit RGB versions, not to a skip."""
    ps = _photo_set()
    reference = images.decode(encode(SMOOTH, "PNG"), channels=3, size=32)
    cmyk = images.decode(encode(SMOOTH.convert("CMYK"), "JPEG", quality=95), channels=3, size=32)
    assert cmyk.dtype == np.uint8 and np.abs(cmyk.astype(int) - reference).mean() < 3
    sixteen = ps.png16(np.asarray(SMOOTH).astype(np.uint16) * 257)
    assert sixteen[24] == 16  # the IHDR's bit depth
    assert (images.decode(sixteen, channels=3, size=32) == reference).all()
    gray16 = encode(Image.fromarray(np.asarray(SMOOTH.convert("L")).astype(np.uint16) * 257), "PNG")
    assert (images.decode(gray16, channels=1, size=32) == images.decode(encode(SMOOTH.convert("L"), "PNG"), 1, 32)).all()


def test_photo_set_bad_inputs_through_the_multicrop_stage() -> None:
    """The benchmark's bad inputs in a Ray Data multi-crop stage call: truncated JPEGs are
    marked not ok (counted as data/skipped_images by the worker), CMYK and 16-bit ones decode;
    the stage never raises and returns every row."""
    from types import SimpleNamespace

    from rayssl.data.datasets import multicrop_stage, stage_rows

    ps = _photo_set()
    bad = ps.bad_inputs(np.asarray(SMOOTH.resize((640, 480))), count=2)
    augment = dict(global_crop_size=24, global_crop_scale=(0.4, 1.0), local_crops=2, local_crop_size=12,
                   local_crop_scale=(0.1, 0.4), flip_prob=0.5, rotation=0.0, color_jitter=0.4, blur_prob=1.0,
                   solarize_prob=0.2)
    assert stage_rows(SimpleNamespace(**augment), 3) == 512  # training calls it with these 6 rows at once
    out = multicrop_stage({"image": list(bad.values())}, augment, channels=3, size=32)
    ok = out["ok"]
    assert dict(zip(bad, ok.tolist())) == {name: not name.startswith("truncated") for name in bad}
    views = out["view_0"]
    assert views.shape == (6, 3, 24, 24) and views.dtype == np.uint8 and views[ok].any() and not views[~ok].any()


def test_batched_blur_and_hue_equal_torchvisions_per_image_ops() -> None:
    """The multi-crop stage's batched Gaussian blur (separable, per-sample sigma) and hue shift
    (per-sample factor) compute what torchvision's ``gaussian_blur`` / ``adjust_hue`` compute
    image by image: the meaning of ``augment.blur_prob`` and ``augment.color_jitter`` is unchanged."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from rayssl.transforms import _blur, _hue

    x = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    sigma, shift = torch.tensor([0.1, 0.7, 1.3, 2.0]), torch.tensor([-0.1, 0.0, 0.05, 0.1])
    for kernel in (3, 9, 23):
        expected = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [float(sigma[i])]) for i in range(4)])
        assert torch.allclose(_blur(x, kernel, sigma), expected, atol=1e-5)
    expected = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(4)])
    assert torch.allclose(_hue(x, shift), expected, atol=1e-6)
