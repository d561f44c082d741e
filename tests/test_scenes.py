"""The scenes set (rayssl/data/scenes.py): Fashion-MNIST items on real photos, built without Ray.

Built from the small Fashion-MNIST (conftest: the first 2,048 train and 512 test items) and the
real photos the installed packages ship; no Ray cluster.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from rayssl.config import ConfigError, load_config
from rayssl.data import scenes
from rayssl.data.fashion_mnist import CLASSES, load_fashion_mnist
from rayssl.data.images import decode_batch
from rayssl.data.manifest import load_manifest
from rayssl.data.shard_writer import COLUMNS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return scenes.load_photos()


@pytest.fixture(scope="module")
def built(small_fashion_mnist, tmp_path_factory) -> Path:
    """Both splits of the small set's scenes, built once: ``<root>/train``, ``<root>/test``."""
    root = tmp_path_factory.mktemp("scenes")
    for split in ("train", "test"):
        scenes.build(small_fashion_mnist, str(root / split), split, progress=lambda line: None)
    return root


def rows(uri: Path) -> dict:
    """Every row of the shards at ``uri``, in manifest order, as columns."""
    m = load_manifest(str(uri))
    tables = [pq.read_table(uri / s["path"]) for s in m["shards"]]
    assert all(t.schema.equals(COLUMNS) for t in tables)
    return {name: [v for t in tables for v in t.column(name).to_pylist()] for name in COLUMNS.names}


def test_compose_is_deterministic_uint8_rgb(small_fashion_mnist, photos) -> None:
    items, _ = load_fashion_mnist(small_fashion_mnist, "train", 300)
    a = scenes.scenes(items, photos, seed=3)
    assert a.shape == (300, scenes.SIZE, scenes.SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, scenes.scenes(items, photos, seed=3, chunk=77))  # chunks do not change a byte
    assert not np.array_equal(a, scenes.scenes(items, photos, seed=4))
    assert not np.array_equal(a, scenes.scenes(items, photos, seed=3, split="test"))  # splits draw apart
    # the item is there: where it is, MNIST-M's |B - 255 A| differs from the photo crop alone
    blank = scenes.scenes(np.zeros_like(items), photos, seed=3)
    assert np.abs(a.astype(int) - blank).mean() > 10
    assert len({tuple(x.reshape(-1, 3).mean(0).round()) for x in blank}) > 250  # varied backgrounds


def test_box_resample_is_an_exact_area_mean() -> None:
    """One photo 4 x 4 -> 2 x 2 boxes: each output pixel the mean of its 2 x 2 block."""
    img = np.arange(16, dtype=np.float64).reshape(1, 4, 4)
    table = scenes._table(img, channels_last=False)
    z = np.zeros(1)
    out = scenes.box_resample(table, np.zeros(1, int), z, z, z + 2, z + 2, size=2)
    assert np.allclose(out[0], img[0].reshape(2, 2, 2, 2).mean((1, 3)))
    # a box [0.5, 2) x [0.5, 2): half of row / column 0, all of row / column 1
    frac = scenes.box_resample(table, np.zeros(1, int), z + 0.5, z + 0.5, z + 1.5, z + 1.5, size=1)
    w = np.array([0.5, 1.0])
    assert np.isclose(frac[0, 0, 0], w @ img[0, :2, :2] @ w / 2.25)
    # outside the source counts as 0 (the item's canvas): a box half off the image
    off = scenes.box_resample(table, np.zeros(1, int), z - 2, z, z + 4, z + 4, size=1)
    assert np.isclose(off[0, 0, 0], img[0, :2].sum() / 16)


def test_labels_and_splits_kept(built, small_fashion_mnist) -> None:
    for split, n in (("train", 2048), ("test", 512)):
        m = load_manifest(str(built / split))
        items, labels = load_fashion_mnist(small_fashion_mnist, split)
        assert m["num_images"] == n and m["split"] == split and m["classes"] == list(CLASSES)
        assert m["channels"] == 3 and m["image_size"] == [scenes.SIZE, scenes.SIZE]
        assert m["class_counts"] == np.bincount(labels, minlength=10).tolist()
        assert len(m["shards"]) == scenes.SHARDS and m["num_skipped"] == 0
        r = rows(built / split)
        # row i is Fashion-MNIST item i of the same split: its label, its class name, its source
        assert r["label"] == labels.tolist()
        assert r["label_name"] == [CLASSES[v] for v in labels]
        stem = "train-images-idx3-ubyte" if split == "train" else "t10k-images-idx3-ubyte"
        assert r["source"] == [f"{small_fashion_mnist}/{stem}.gz#{i}" for i in range(n)]
        assert len(set(r["id"])) == n
        # the stored PNGs are exactly the construction's pixels
        pixels, ok = decode_batch(r["image"], 3, scenes.SIZE)
        assert ok.all()
        assert np.array_equal(pixels, scenes.scenes(items, scenes.load_photos(), split=split))
    train, test = (set(rows(built / s)["id"]) for s in ("train", "test"))
    assert not train & test


def test_build_is_deterministic_and_built_once(built, small_fashion_mnist, tmp_path) -> None:
    lines: list[str] = []
    again = scenes.build(small_fashion_mnist, str(built / "test"), "test", progress=lines.append)
    assert lines == [f"[make_shards] {built / 'test'}: up to date (512 images, {scenes.SHARDS} shards)"]
    elsewhere = scenes.build(small_fashion_mnist, str(tmp_path / "test"), "test", progress=lambda line: None)
    assert elsewhere["content_hash"] == again["content_hash"]  # same bytes, another build
    for s in again["shards"]:
        assert (tmp_path / "test" / s["path"]).read_bytes() == (built / "test" / s["path"]).read_bytes()
    other = scenes.build(small_fashion_mnist, str(tmp_path / "seed1"), "test", seed=1, progress=lambda line: None)
    assert other["content_hash"] != again["content_hash"]


@pytest.mark.parametrize("name, data, reason", [
    ("truncated.jpg", "truncated", "corrupt image"),
    ("empty.png", b"", "empty file"),
    ("notes.jpg", b"not a photo at all", "not an image"),
    ("missing.jpg", None, "not found"),
    ("tiny.png", "tiny", "smaller than 32 px"),
])
def test_bad_photo_gives_one_line_naming_it(small_fashion_mnist, tmp_path, name, data, reason) -> None:
    import io

    from PIL import Image

    path = tmp_path / name
    if data == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(buf, "JPEG")
        data = buf.getvalue()[:200]
    elif data == "tiny":
        buf = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
        data = buf.getvalue()
    if data is not None:
        path.write_bytes(data)
    good = scenes.photo_paths()[0]
    with pytest.raises(ConfigError) as err:
        scenes.build(small_fashion_mnist, str(tmp_path / "out"), "test", photos=[good, str(path)])
    message = str(err.value)
    assert "\n" not in message and str(path) in message and reason in message, message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_photo_package_is_named(monkeypatch) -> None:
    monkeypatch.setattr(scenes, "PHOTOS", (("sklearn", "datasets/images/china.jpg"),
                                           ("no_such_photo_package", "data/x.png")))
    monkeypatch.setitem(scenes._INSTALL, "no_such_photo_package", "no-such-photo-package")
    with pytest.raises(ConfigError, match=r"^fashion-mnist-scenes: photo no_such_photo_package/data/x.png: "
                                          r"no-such-photo-package is not installed .*$"):
        scenes.photo_paths()


def test_config_source_builds_once_and_reads_back(small_fashion_mnist, tmp_path, monkeypatch) -> None:
    """``data.source: fashion-mnist-scenes`` (configs/fashion_mnist_scenes.yaml) through the job's
    data plan (no Ray needed), then its shards through the reader of the training stream."""
    from rayssl.data import datasets
    from rayssl.transforms import MultiCrop

    cfg = load_config(ROOT / "configs/fashion_mnist_scenes.yaml",
                      [f"data.cache_dir={tmp_path}", f"data.fashion_mnist_dir={small_fashion_mnist}"])
    plan = datasets.plan_data(cfg)
    meta = plan.meta
    assert (meta.num_train, meta.num_eval, meta.channels, meta.image_size) == (2048, 512, 3, scenes.SIZE)
    assert meta.classes == CLASSES and len(meta.mean) == len(meta.std) == 3
    assert plan.train_uri == str(tmp_path / scenes.NAME / "train") and plan.eval_uri.endswith("/test")
    fs, root = pyarrow.fs.LocalFileSystem(), plan.train_uri
    pieces = datasets.shard_pieces(plan.train, root, None)
    blocks = list(datasets.read_pieces({"id": np.arange(len(pieces))}, pieces, fs, 300))
    encoded = [v for b in blocks for v in b.column("image").to_pylist()]
    assert len(encoded) == 2048
    x, ok = decode_batch(encoded[:64], meta.channels, meta.image_size)
    assert ok.all()
    import torch

    views = MultiCrop(cfg.augment, 3, meta.mean, meta.std)(torch.from_numpy(x).permute(0, 3, 1, 2))
    assert [tuple(v.shape) for v in views] == [(64, 3, 32, 32)] * 2
    # a bad photo on this path: one line naming the field and the file
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    monkeypatch.setattr(scenes, "photo_paths", lambda: [str(bad)])
    with pytest.raises(ConfigError, match=rf"^data.source: fashion-mnist-scenes: photo {bad}: [^\n]+$"):
        datasets.plan_data(cfg)


def test_make_shards_cli(small_fashion_mnist, tmp_path) -> None:
    cmd = [sys.executable, str(ROOT / "jobs/make_shards.py"), "fashion-mnist-scenes", str(tmp_path / "t"),
           "--split", "test", "--fashion-mnist-dir", small_fashion_mnist, "--min-shards", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("512 images, 2 shards, ")
    assert load_manifest(str(tmp_path / "t"))["split"] == "test"
    bad = subprocess.run(cmd[:-4] + ["--fashion-mnist-dir", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr == f"error: {tmp_path / 'nowhere'}: not found\n", bad.stderr
