"""End to end on a real S3-compatible server: image folder -> shards in s3:// -> 2-worker
pretraining streamed from s3:// with checkpoints in s3://, resumed; bad rows skipped and counted."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rayssl.config import load_config
from rayssl.data import storage
from rayssl.data.fashion_mnist import CLASSES, load_fashion_mnist
from rayssl.data.shards import MANIFEST, make_shards
from rayssl.train.launch import pretrain

ROOT = Path(__file__).resolve().parents[1]
BAD_ROWS = 8


def image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Fashion-MNIST images as PNG files in class folders, plus files that cannot be images."""
    for i, (x, y) in enumerate(zip(images, labels)):
        folder = root / f"{y}-{CLASSES[y].replace('/', '-')}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(folder / f"{i:05d}.png")
    (root / "0-T-shirt-top" / "empty.png").write_bytes(b"")
    (root / "1-Trouser" / "notes.jpg").write_text("not an image")
    return root


def add_bad_shard(uri: str) -> None:
    """Append a shard of undecodable rows to a manifest, as if bytes rotted after sharding."""
    fs, root = storage.resolve(uri)
    with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
        manifest = json.loads(f.read())
    like = pq.read_table(f"{root}/{manifest['shards'][0]['path']}", filesystem=fs).slice(0, BAD_ROWS)
    bad = like.set_column(like.schema.get_field_index("image"), "image",
                          pa.array([b"\x89PNG\r\n\x1a\n rotten"] * BAD_ROWS, pa.binary()))
    pq.write_table(bad, f"{root}/shard-bad.parquet", filesystem=fs)
    manifest["shards"].append({"path": "shard-bad.parquet", "num_images": BAD_ROWS, "bytes": 0, "sha256": ""})
    manifest["num_images"] += BAD_ROWS
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps(manifest).encode())


def test_shards_in_s3_stream_into_training_and_resume(ray_cluster, s3_server, tmp_path, fashion_mnist_dir) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_server)
    bucket = f"data-{uuid.uuid4().hex[:6]}"
    s3.create_bucket(Bucket=bucket)
    x, y = load_fashion_mnist(fashion_mnist_dir, "train", 632)
    xt, yt = load_fashion_mnist(fashion_mnist_dir, "test", 200)
    train_uri, test_uri = f"s3://{bucket}/fm/train", f"s3://{bucket}/fm/test"
    manifest = make_shards(str(image_folder(tmp_path / "train", x, y)), train_uri, min_shards=4)
    make_shards(str(image_folder(tmp_path / "test", xt, yt)), test_uri, min_shards=2)
    assert manifest["num_images"] == 632 and manifest["num_skipped"] == 2
    add_bad_shard(train_uri)  # 640 rows = 2 workers x 32 x 10 steps

    name = f"s3-stream-{uuid.uuid4().hex[:6]}"
    overrides = [f"data.source={train_uri}", f"data.eval_source={test_uri}", "data.shuffle_buffer=64",
                 "model.width=8", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
                 "objective.num_clusters=32", "train.batch_size=32", "train.log_every=5",
                 "train.checkpoint_every=10", "optim.warmup_epochs=0", "scaling.num_workers=2",
                 "scaling.cpus_per_worker=1", f"run.storage_path=s3://{bucket}/runs", f"run.name={name}",
                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.log_model=false"]
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [*overrides, "train.epochs=2"])
    first = pretrain(cfg)
    assert [m["step"] for m in first["history"]] == [5, 10, 15, 20]
    assert first["history"][-1]["data/skipped_images"] == 2 * BAD_ROWS  # every bad row, each epoch
    assert 0.3 < first["knn/raw_pixels"] <= 1 and 0 <= first["knn/teacher"] <= 1
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{name}/")["Contents"]]
    assert sum(k.endswith("checkpoint.pt") for k in keys) == 2

    second = pretrain(load_config(ROOT / "configs/fashion_mnist.yaml", [*overrides, "train.epochs=3"]))
    assert second["resumed_from_step"] == 20
    assert [m["step"] for m in second["history"]] == [25, 30]
    assert second["history"][-1]["data/skipped_images"] == 3 * BAD_ROWS


def test_wrong_credentials_stop_before_training(strict_s3_server, tmp_path) -> None:
    """Refused keys are found by the input checks, before Ray starts (no cluster needed)."""
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [
        "data.source=s3://shards/train", f"data.endpoint_url={strict_s3_server}",
        f"run.storage_path={tmp_path}", "run.name=denied"])
    with pytest.raises(storage.StorageError) as err:
        pretrain(cfg)
    assert str(err.value).startswith("data.source: s3://shards/train: access denied")
    assert not (tmp_path / "denied").exists()
