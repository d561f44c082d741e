"""make_shards on real inputs: image folders with bad files, IDX, listings; S3 via moto; real Ray."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rayssl.data import storage
from rayssl.data.shards import COLUMNS, MANIFEST, load_manifest, make_shards

ROOT = Path(__file__).resolve().parents[1]


def noise(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A random image of ``mode`` (RGB or L)."""
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def encoded(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def labelled_folder(root: Path) -> dict[str, str]:
    """3 classes of good, odd-mode and broken files; {file: expected skip reason prefix}."""
    write(root / "cat/a.jpg", encoded(noise(40, 30, 1), "JPEG"))
    write(root / "cat/b.png", encoded(noise(32, 32, 2, "L"), "PNG"))
    write(root / "cat/sub/c.webp", encoded(noise(24, 24, 3), "WEBP"))
    write(root / "dog/d.bmp", encoded(noise(20, 16, 4), "BMP"))
    write(root / "dog/e.tiff", encoded(noise(16, 20, 5), "TIFF"))
    write(root / "dog/f.jpg", encoded(noise(33, 33, 6), "JPEG"))
    write(root / "dog/notes.txt", b"not an input")
    write(root / "zebra/cmyk.jpg", encoded(noise(30, 30, 7).convert("CMYK"), "JPEG"))
    deep = np.random.default_rng(8).integers(0, 65536, (18, 18)).astype(np.uint16)
    write(root / "zebra/deep.png", encoded(Image.fromarray(deep), "PNG"))
    write(root / "zebra/palette.png", encoded(noise(22, 22, 9).convert("P"), "PNG"))
    write(root / "zebra/rgba.png", encoded(Image.new("RGBA", (12, 12), (10, 200, 30, 128)), "PNG"))
    write(root / "dog/zero.jpg", b"")
    write(root / "dog/trunc.jpg", encoded(noise(64, 64, 10), "JPEG", quality=95)[:1500])
    write(root / "dog/trunc.png", encoded(noise(64, 64, 11), "PNG")[:3000])
    write(root / "dog/text.png", b"hello, I am text\n" * 20)
    os.symlink(root / "dog/missing-target.jpg", root / "dog/dangling.jpg")
    return {"dog/zero.jpg": "empty file", "dog/trunc.jpg": "corrupt image", "dog/trunc.png": "corrupt image",
            "dog/text.png": "not an image", "dog/dangling.jpg": "unreadable"}


def bucket(name: str) -> str:
    """A new bucket on the moto server; its name."""
    name = f"{name}-{uuid.uuid4().hex[:6]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def objects(name: str, prefix: str) -> dict[str, object]:
    """{key: LastModified} of the objects under ``prefix`` (not pyarrow's folder markers)."""
    found = boto3.client("s3").list_objects_v2(Bucket=name, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o["LastModified"] for o in found if not o["Key"].endswith("/")}


def read_shards(uri: str, manifest: dict) -> pa.Table:
    fs, root = storage.resolve(uri)
    return pa.concat_tables(pq.read_table(f"{root}/{s['path']}", filesystem=fs) for s in manifest["shards"])


def test_labelled_folder_to_s3_with_bad_files_rerun_and_force(ray_cluster, s3_server, tmp_path) -> None:
    src = tmp_path / "labelled"
    expected_skips = labelled_folder(src)
    name = bucket("shards")
    dst = f"s3://{name}/run/train"
    lines: list[str] = []
    m = make_shards(str(src), dst, progress=lines.append)

    assert (m["num_images"], m["num_skipped"], m["num_converted"]) == (10, 5, 4)
    assert {os.path.relpath(s["source"], src): s["reason"][:len(expected_skips[os.path.relpath(s["source"], src)])]
            for s in m["skipped"]} == expected_skips
    assert {os.path.relpath(c["source"], src): c["reason"] for c in m["converted"]} == {
        "zebra/cmyk.jpg": "CMYK -> RGB", "zebra/deep.png": "I;16 -> L",
        "zebra/palette.png": "P -> RGB", "zebra/rgba.png": "RGBA -> RGB"}
    assert m["classes"] == ["cat", "dog", "zebra"] and m["class_counts"] == [3, 3, 4]
    assert m["channels"] == 3 and m["image_size"] is None and len(m["mean"]) == len(m["std"]) == 3
    assert len(m["shards"]) == 8 and sum(s["num_images"] for s in m["shards"]) == 10
    keys = objects(name, "run/train/")
    assert {f"run/train/{s['path']}" for s in m["shards"]} | {"run/train/manifest.json"} == set(keys)
    assert any("8/8 shards, 10 images" in line for line in lines)

    table = read_shards(dst, m)
    assert table.schema.names == COLUMNS.names and table.schema.equals(COLUMNS, check_metadata=False)
    assert table.num_rows == 10 and len(set(table["id"].to_pylist())) == 10
    rows = {os.path.relpath(r["source"], src): r for r in table.to_pylist()}
    assert list(rows) == sorted(rows)  # sorted source order across shards
    assert rows["cat/a.jpg"]["image"] == (src / "cat/a.jpg").read_bytes()
    assert (rows["cat/a.jpg"]["width"], rows["cat/a.jpg"]["height"]) == (40, 30)
    assert rows["cat/sub/c.webp"]["label"] == 0 and rows["zebra/rgba.png"]["label_name"] == "zebra"
    modes = {k: Image.open(io.BytesIO(rows[k]["image"])).mode
             for k in ("zebra/cmyk.jpg", "zebra/deep.png", "zebra/palette.png", "zebra/rgba.png")}
    assert modes == {"zebra/cmyk.jpg": "RGB", "zebra/deep.png": "L", "zebra/palette.png": "RGB",
                     "zebra/rgba.png": "RGB"}
    assert load_manifest(dst) == m

    lines.clear()
    again = make_shards(str(src), dst, progress=lines.append)
    assert again == m and objects(name, "run/train/") == keys
    assert any("up to date" in line for line in lines)

    boto3.client("s3").put_object(Bucket=name, Key="run/train/shard-00099.parquet", Body=b"stale")
    forced = make_shards(str(src), dst, force=True, progress=lines.append)
    assert forced["content_hash"] == m["content_hash"]
    assert [s["sha256"] for s in forced["shards"]] == [s["sha256"] for s in m["shards"]]
    assert set(objects(name, "run/train/")) == set(keys)  # the stale shard is gone


def test_flat_s3_folder_is_unlabelled(ray_cluster, s3_server, tmp_path) -> None:
    name = bucket("flat")
    s3 = boto3.client("s3")
    for i in range(3):
        s3.put_object(Bucket=name, Key=f"imgs/{i}.png", Body=encoded(noise(16, 16, i, "L"), "PNG"))
    m = make_shards(f"s3://{name}/imgs", str(tmp_path / "out"), progress=lambda line: None)
    assert (m["num_images"], m["classes"], m["class_counts"]) == (3, [], [])
    assert (m["channels"], m["image_size"], len(m["mean"])) == (1, [16, 16], 1)
    table = read_shards(str(tmp_path / "out"), m)
    assert table["label"].null_count == 3 and table["source"].to_pylist()[0] == f"s3://{name}/imgs/0.png"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_idx_source_is_lossless_and_labelled(ray_cluster, tmp_path) -> None:
    src = tmp_path / "digits"
    src.mkdir()
    rng = np.random.default_rng(0)
    pixels, labels = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 10, 50)
    write_idx(src / "train-images-idx3-ubyte.gz", pixels)
    write_idx(src / "train-labels-idx1-ubyte", labels)
    dst, started = tmp_path / "shards", []
    m = make_shards(str(src), str(dst), progress=lambda line: None, start_ray=lambda: started.append(1))
    assert started == [1]  # called once, before any shard is written
    assert make_shards(str(src), str(dst), progress=lambda line: None, start_ray=lambda: started.append(1)) == m
    assert started == [1]  # up to date: no work, so no Ray
    assert (m["num_images"], m["channels"], m["image_size"]) == (50, 1, [28, 28])
    assert m["classes"] == [str(i) for i in range(10)]
    assert m["class_counts"] == np.bincount(labels, minlength=10).tolist()
    table = read_shards(str(dst), m)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in table["image"].to_pylist()])
    assert np.array_equal(decoded, pixels) and table["label"].to_pylist() == labels.tolist()
    assert table["source"][7].as_py() == f"{src}/train-images-idx3-ubyte.gz#7"
    assert sorted(p.name for p in dst.iterdir()) == [MANIFEST] + [f"shard-{i:05d}.parquet" for i in range(8)]
    with pytest.raises(storage.StorageError, match="t10k-images-idx3-ubyte"):
        make_shards(str(src), str(dst), split="test", progress=lambda line: None)


def test_csv_listing_with_relative_paths(ray_cluster, tmp_path) -> None:
    for i in range(3):
        write(tmp_path / f"imgs/{i}.jpg", encoded(noise(20, 20, i), "JPEG"))
    (tmp_path / "list.csv").write_text(
        "path,label,label_name\nimgs/0.jpg,1,bird\nimgs/1.jpg,0,ant\n"
        f"{tmp_path}/imgs/2.jpg,1,bird\nimgs/gone.jpg,0,ant\nimgs/1.jpg,0,ant\n")
    m = make_shards(str(tmp_path / "list.csv"), str(tmp_path / "out"), progress=lambda line: None)
    assert (m["num_images"], m["classes"], m["class_counts"]) == (3, ["ant", "bird"], [1, 2])
    assert [(Path(s["source"]).name, s["reason"].split(":")[0]) for s in m["skipped"]] == [
        ("1.jpg", "duplicate listing row"), ("gone.jpg", "unreadable")]
    table = read_shards(str(tmp_path / "out"), m)
    assert table["image"][0].as_py() == (tmp_path / "imgs/2.jpg").read_bytes()  # the absolute path sorts first


def test_bad_destination_and_listing_columns(s3_server, tmp_path) -> None:
    write(tmp_path / "imgs/0.png", encoded(noise(8, 8, 0), "PNG"))
    with pytest.raises(storage.StorageError) as err:
        make_shards(str(tmp_path / "imgs"), "s3://no-such-bucket-xyz/shards")
    assert str(err.value).startswith("s3://no-such-bucket-xyz/shards: bucket does not exist")
    (tmp_path / "list.csv").write_text("file,label\nimgs/0.png,0\n")
    with pytest.raises(storage.ConfigError, match=r"list\.csv: a listing needs a 'uri' or 'path' column"):
        make_shards(str(tmp_path / "list.csv"), str(tmp_path / "out"))
    with pytest.raises(storage.StorageError, match="load_manifest-missing: no manifest.json"):
        load_manifest(str(tmp_path / "load_manifest-missing"))


def test_cli_help_and_missing_source(tmp_path) -> None:
    script = [sys.executable, str(ROOT / "jobs/make_shards.py")]
    help_text = subprocess.run([*script, "--help"], capture_output=True, text=True, check=True).stdout
    assert "64-256 MB" in help_text and "--reencode" in help_text
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    missing = tmp_path / "nowhere"
    done = subprocess.run([*script, str(missing), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {missing}: not found"]


def test_scan_and_plan_without_ray(tmp_path) -> None:
    """The driver's listing and packing alone: sorted, labelled inputs, contiguous shard plans."""
    from rayssl.data.shards import pack, plan, scan

    labelled_folder(tmp_path / "src")
    inputs = scan(str(tmp_path / "src"))
    keys = [item["key"] for item in inputs.items]
    assert (inputs.kind, inputs.classes, inputs.ignored) == ("folder", ["cat", "dog", "zebra"], 1)
    assert keys == sorted(keys) and len(keys) == 15 and "dog/notes.txt" not in keys
    assert {item["label_name"]: item["label"] for item in inputs.items} == {"cat": 0, "dog": 1, "zebra": 2}
    plans = plan(inputs, target_shard_mb=64, min_shards=4)
    assert [p["path"] for p in plans] == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert [item["key"] for p in plans for item in p["items"]] == keys
    assert pack([5, 1, 1, 1], target_bytes=4, min_shards=1) == [(0, 1), (1, 4)]
