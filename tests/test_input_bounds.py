"""Untrusted inputs are bounded: crafted files (a decompression-bomb PNG, an oversized item, listing
rows that leave the listing's folder, an over-long gzip) each get one line, and the rest goes on."""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import boto3
import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rayssl.config import ConfigError
from rayssl.data import images
from rayssl.data.fashion_mnist import read_idx
from rayssl.data.shard_writer import ShardJob, write_shard
from rayssl.data.shards import make_shards
from rayssl.data.sources import scan
from rayssl.data.storage import S3Options

SMALL = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 9 KB PNG
SMOOTH = Image.linear_gradient("L").resize((64, 48)).convert("RGB")  # a few hundred bytes as PNG


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A 1-bit paletted PNG of ``width`` x ``height`` black pixels, a few dozen KB on disk; only the first
    ``rows`` rows when given, the stream cut there (truncated)."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height if rows is None else rows))
    data += z.flush() if rows is None else z.flush(zlib.Z_SYNC_FLUSH)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0))
            + _chunk(b"PLTE", bytes(6)) + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = bomb_png(20000, 20000)
    assert len(bomb) < 100_000  # 400 M pixels in a few dozen KB
    with pytest.raises(images.BadImage) as err:
        images.check(bomb)
    assert str(err.value) == "too large: 20000 x 20000 pixels, over data.max_image_pixels=89478485"
    out, ok = images.decode_batch([encode(SMALL, "PNG"), bomb], channels=3, size=16)  # training's decode
    assert ok.tolist() == [True, False] and not out[1].any()


def test_the_pixel_cap_is_configurable_both_ways() -> None:
    png = encode(SMALL, "PNG")  # 64 x 48 = 3072 pixels
    assert images.check(png, limits=images.Limits(max_pixels=3072)).width == 64
    with pytest.raises(images.BadImage, match=r"^too large: 64 x 48 pixels, over data.max_image_pixels=3071$"):
        images.check(png, limits=images.Limits(max_pixels=3071))
    # Above Pillow's own refusal (2 x 89.5 M pixels) the cap is ours alone: this 225 M-pixel header
    # passes it and the truncated stream behind it is what fails, as a corrupt image.
    truncated = bomb_png(15000, 15000, rows=4)
    with pytest.raises(images.BadImage, match="^corrupt image"):
        images.check(truncated, limits=images.Limits(max_pixels=300_000_000))
    with pytest.raises(images.BadImage, match="^too large"):
        images.check(truncated)


def test_an_oversized_item_is_refused_before_and_after_conversion() -> None:
    png = encode(SMALL, "PNG")
    with pytest.raises(images.BadImage, match=rf"^too large: {len(png)} bytes, over data.max_item_bytes=1000$"):
        images.check(png, limits=images.Limits(max_bytes=1000))
    _, ok = images.decode_batch([png], channels=3, size=16, limits=images.Limits(max_bytes=len(png) - 1))
    assert ok.tolist() == [False]
    cmyk = encode(SMALL.convert("CMYK"), "JPEG", quality=30)  # converted to a larger RGB PNG
    with pytest.raises(images.BadImage, match=r"^too large: \d+ bytes as PNG, over data.max_item_bytes="):
        images.check(cmyk, limits=images.Limits(max_bytes=len(cmyk)))


def write_one_shard(items: list[dict], dest: Path, limits: images.Limits) -> dict:
    """``write_shard`` of ``items`` into ``dest`` (the work of one make_shards task, without Ray)."""
    dest.mkdir()
    job = ShardJob(pyarrow.fs.LocalFileSystem(), str(dest), None, [], S3Options(), limits)
    return write_shard({"index": 0, "path": "shard-00000.parquet", "items": items}, job)


def test_make_shards_skips_a_bomb_and_an_oversized_file_and_keeps_the_rest(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(encode(SMOOTH, "PNG"))
    (src / "b.jpg").write_bytes(encode(SMOOTH, "JPEG"))
    (src / "bomb.png").write_bytes(bomb_png(20000, 20000))  # under the byte cap
    (src / "big.bmp").write_bytes(encode(SMOOTH.resize((200, 200)), "BMP"))  # 120 KB uncompressed
    stats = write_one_shard(scan(str(src)).items, tmp_path / "out", images.Limits(max_bytes=100_000))
    assert stats["num_images"] == 2
    assert {Path(s["source"]).name: s["reason"] for s in stats["skipped"]} == {
        "big.bmp": "too large: over 100000 bytes (data.max_item_bytes)",
        "bomb.png": "too large: 20000 x 20000 pixels, over data.max_image_pixels=89478485"}
    table = pq.read_table(tmp_path / "out/shard-00000.parquet")
    assert [Path(s).name for s in table["source"].to_pylist()] == ["a.png", "b.jpg"]


def test_invalid_caps_are_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^max_item_bytes: must be >= 1 \(got 0\)$"):
        make_shards(str(tmp_path), str(tmp_path / "out"), limits=images.Limits(max_bytes=0))


def test_the_make_shards_job_takes_the_caps_with_the_config_defaults() -> None:
    script = Path(__file__).resolve().parents[1] / "jobs/make_shards.py"
    out = " ".join(subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                  check=True).stdout.split())
    limits = images.Limits()
    assert f"--max-image-pixels MAX_IMAGE_PIXELS skip images with more pixels, read from the header " \
           f"(default: {limits.max_pixels})" in out
    assert f"(default: {limits.max_bytes})" in out and "--allow-outside-root" in out


def listing_folder(tmp_path: Path) -> Path:
    """``tmp_path/data/list.csv`` naming two images inside its folder and three outside it."""
    (tmp_path / "data/imgs").mkdir(parents=True)
    for name in ("data/imgs/a.png", "data/imgs/b.png", "outside.png"):
        (tmp_path / name).write_bytes(encode(SMALL, "PNG"))
    listing = tmp_path / "data/list.csv"
    listing.write_text("path\nimgs/a.png\n../outside.png\nimgs/../imgs/b.png\n"
                       f"{tmp_path}/outside.png\nimgs/../../data/../outside.png\n")
    return listing


def test_listing_rows_outside_its_folder_are_skipped_with_their_line(tmp_path) -> None:
    listing = listing_folder(tmp_path)
    inputs = scan(str(listing))
    assert [item["key"] for item in inputs.items] == ["imgs/../imgs/b.png", "imgs/a.png"]
    folder = tmp_path / "data"
    assert sorted(s["reason"] for s in inputs.skipped) == [
        f"{listing} line {n}: outside the listing's folder {folder} (make_shards --allow-outside-root allows it)"
        for n in (3, 5, 6)]
    stats = write_one_shard(inputs.items, tmp_path / "out", images.Limits())
    assert stats["num_images"] == 2 and stats["skipped"] == []  # the rest goes on
    allowed = scan(str(listing), allow_outside_root=True)
    assert len(allowed.items) == 5 and allowed.skipped == []


def test_a_parquet_listing_names_the_row(tmp_path) -> None:
    listing_folder(tmp_path)
    listing = tmp_path / "data/list.parquet"
    pq.write_table(pyarrow.table({"uri": ["imgs/a.png", "/etc/hostname"]}), listing)
    inputs = scan(str(listing))
    assert [item["key"] for item in inputs.items] == ["imgs/a.png"]
    assert [s["reason"].split(": ")[0] for s in inputs.skipped] == [f"{listing} row 2"]


def test_an_s3_listing_stays_in_its_bucket_and_prefix(s3_server) -> None:
    s3 = boto3.client("s3")
    for name in ("listing-home", "listing-other"):
        s3.create_bucket(Bucket=name)
    for key in ("data/a.png", "elsewhere/b.png"):
        s3.put_object(Bucket="listing-home", Key=key, Body=encode(SMALL, "PNG"))
    rows = ["a.png", "s3://listing-home/data/a.png", "../elsewhere/b.png", "s3://listing-other/a.png",
            "s3://listing-homer/data/a.png", "/etc/hostname"]
    s3.put_object(Bucket="listing-home", Key="data/list.csv", Body=("uri\n" + "\n".join(rows) + "\n").encode())
    inputs = scan("s3://listing-home/data/list.csv")
    assert sorted(item["uri"] for item in inputs.items) == ["s3://listing-home/data/a.png"] * 2
    assert sorted(int(s["reason"].split(": ")[0].split()[-1]) for s in inputs.skipped) == [4, 5, 6, 7]


def write_idx_gz(path: Path, dims: tuple[int, ...], body_bytes: int) -> Path:
    """A gzipped uint8 IDX file whose header gives ``dims`` and whose data holds ``body_bytes`` zeros."""
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims))
        for start in range(0, body_bytes, 2**20):
            f.write(bytes(min(2**20, body_bytes - start)))
    return path


def test_an_over_long_or_short_gzip_is_refused_naming_the_file(tmp_path) -> None:
    exact = write_idx_gz(tmp_path / "exact.gz", (2, 28, 28), 2 * 784)
    assert read_idx(exact).shape == (2, 28, 28)
    bomb = write_idx_gz(tmp_path / "bomb.gz", (2, 28, 28), 64 * 2**20)  # 64 MiB behind a 1568-byte header
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ValueError) as err:
        read_idx(bomb)
    assert str(err.value) == f"{bomb}: holds more than the 1568 data bytes its IDX header gives"
    short = write_idx_gz(tmp_path / "short.gz", (2, 28, 28), 784)
    with pytest.raises(ValueError, match=r"short\.gz: truncated IDX file \(784 of 1568 data bytes\)$"):
        read_idx(short)


def test_an_idx_source_with_an_over_long_file_stops_with_one_line(tmp_path) -> None:
    images_file = write_idx_gz(tmp_path / "train-images-idx3-ubyte.gz", (2, 28, 28), 2 * 784 + 1)
    write_idx_gz(tmp_path / "train-labels-idx1-ubyte.gz", (2,), 2)
    with pytest.raises(ConfigError) as err:
        scan(str(tmp_path))
    assert str(err.value) == f"{images_file}: holds more than the 1568 data bytes its IDX header gives"
