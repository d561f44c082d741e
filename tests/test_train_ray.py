"""Integration: real Ray Train runs (2 gloo workers) on real servers: moto S3, ``mlflow server``."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rayssl.checkpoint import CHECKPOINT_FILE, candidates, load_intact
from rayssl.config import ConfigError, load_config
from rayssl.data import storage
from rayssl.data.fashion_mnist import CLASSES, load_fashion_mnist
from rayssl.data.shards import MANIFEST, make_shards
from rayssl.train.launch import pretrain

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, shards: list[str], name: str, *extra: str):
    return load_config(ROOT / "configs/fashion_mnist.yaml", [
        *shards, "data.train_limit=1024", "data.eval_limit=256", "train.time_budget=null", "eval.every_epochs=null",
        "model.width=8", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
        "objective.num_clusters=32", "train.batch_size=32", "train.steps_per_epoch=6",
        "train.log_every=2", "train.checkpoint_every=6", "optim.lr=0.005", "optim.warmup_epochs=0",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        f"run.storage_path={tmp_path}", f"run.name={name}", *extra])


# conftest's shared ``tiny_run``: 12 steps on 1,024 images, deterministic data, a checkpoint every
# 3 steps, online k-NN each epoch. test_faults' killed run uses the same overrides (another name).
TINY_RUN = ["train.epochs=2", "train.log_every=3", "train.checkpoint_every=3", "eval.baselines=false",
            "eval.every_epochs=1", "objective.prior_momentum=0.9", "data.deterministic=true",
            "data.decode_on=worker", "run.max_failures=1", "tracking.log_model=false"]


def checkpoints(fs: pyarrow.fs.FileSystem, run_path: str) -> list[dict]:
    """The intact checkpoints of a run folder, oldest step first."""
    states = [load_intact(fs, folder) for folder in candidates(fs, run_path)]
    return [s for s in reversed(states) if s is not None]


FAKE_KEY, FAKE_SECRET = "AKIAFAKE7RAYSSL0TEST", "fake+Secret/Key0of0the0rayssl0tests"
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


def test_shards_in_s3_train_checkpoint_in_s3_and_resume(ray_cluster, s3_server, tmp_path, fashion_mnist_dir,
                                                        mlflow_server, monkeypatch) -> None:
    """End to end on real servers: an image folder (with files that are not images) -> shards in
    s3:// (plus a shard of rotten rows) -> 2 workers streaming from s3:// with checkpoints in
    s3:// and MLflow on a real ``mlflow server``. Then a second launch of the same run resumes
    the newest *intact* checkpoint (the last one is truncated on purpose in between) and
    continues its MLflow run. The S3 keys never reach a log, a checkpoint or the store."""
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

    name = f"it-{uuid.uuid4().hex[:8]}"
    uri, store = mlflow_server
    overrides = [f"data.source={train_uri}", f"data.eval_source={test_uri}", "data.shuffle_buffer=64",
                 "data.decode_on=data",  # the cluster path: Ray Data tasks crop (the default config crops in the worker)
                 "model.width=8", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
                 "objective.num_clusters=32", "objective.prior_momentum=0.9", "train.batch_size=32",
                 "train.log_every=5", "train.checkpoint_every=10", "optim.warmup_epochs=0", "eval.every_epochs=null",
                 "eval.gallery_clusters=0",  # the galleries: tests/test_evaluate.py, tests/test_s3_outage.py
                 "scaling.num_workers=2", "scaling.cpus_per_worker=1", f"run.storage_path=s3://{bucket}/runs",
                 f"run.name={name}", f"tracking.uri={uri}", "tracking.experiment=resume-test",
                 "tracking.register_as=resume-test", f"data.access_key_id={FAKE_KEY}",
                 f"data.secret_access_key={FAKE_SECRET}"]
    first = pretrain(load_config(ROOT / "configs/fashion_mnist.yaml", [*overrides, "train.epochs=2"]))

    losses = [m["loss"] for m in first["history"]]
    assert [m["step"] for m in first["history"]] == [5, 10, 15, 20]
    assert losses[-1] < losses[0]
    assert first["history"][-1]["data/skipped_images"] == 2 * BAD_ROWS  # every bad row, each epoch
    assert 0.3 < first["knn/raw_pixels"] <= 1 and 0 <= first["knn/teacher"] <= 1
    assert "resumed_from_step" not in first
    fs, run_root = storage.resolve(f"s3://{bucket}/runs/{name}")  # AWS_ENDPOINT_URL: the moto server
    saved = checkpoints(fs, run_root)
    assert [c["step"] for c in saved] == [10, 20]
    prior_at_20 = saved[-1]["objective"]["log_prior_ema"]
    uniform = torch.full_like(prior_at_20, -torch.log(torch.tensor(32.0)))
    assert not torch.allclose(prior_at_20, uniform)  # the EMA moved: there is state to restore

    # Truncate the newest checkpoint in the bucket (a crash while uploading it), then relaunch
    # with the same run name and a longer schedule: resumes at step 10, the newest intact one.
    newest = candidates(fs, run_root)[0]
    key = f"{newest}/{CHECKPOINT_FILE}".split("/", 1)[1]
    data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=data[:len(data) // 2])
    second = pretrain(load_config(ROOT / "configs/fashion_mnist.yaml", [*overrides, "train.epochs=3"]))
    assert second["resumed_from_step"] == 10
    assert [m["step"] for m in second["history"]] == [15, 20, 25, 30]
    assert second["history"][-1]["data/skipped_images"] == 3 * BAD_ROWS
    assert second["knn/raw_pixels"] == first["knn/raw_pixels"]  # baselines carried, not recomputed
    final = checkpoints(fs, run_root)[-1]
    assert final["step"] == 30
    assert not torch.equal(final["objective"]["log_prior_ema"], prior_at_20)

    assert second["mlflow_run_id"] == first["mlflow_run_id"] == final["tracking"]["run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve in the default store
    check_mlflow_run(uri, "resume-test", first["mlflow_run_id"], f"s3://{bucket}/runs/{name}", s3_server)
    logs = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    for folder in (Path(store), tmp_path, logs):  # the whole MLflow store, local files, Ray's logs
        for path in (p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            assert FAKE_SECRET.encode() not in data and FAKE_KEY.encode() not in data, path
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]:  # checkpoints, run files
        data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        assert FAKE_SECRET.encode() not in data and FAKE_KEY.encode() not in data, obj["Key"]


def check_mlflow_run(uri: str, experiment: str, run_id: str, run_path: str, endpoint: str) -> None:
    """The MLflow run of the resume test: params, one metric point per step, plots, model."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    import rayssl

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the relaunch logged into the same run
    run = runs[0]
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["objective.mode"] == "prior" and params["objective.num_clusters"] == "32"
    assert params["train.epochs"] == "2.0" and tags["resumed.train.epochs"] == "3.0"
    assert params["data.secret_access_key"] == "***" and params["data.access_key_id"] == "***"
    assert tags["rayssl.version"] == rayssl.__version__ and tags["scaling.num_workers"] == "2"
    for key in ("loss", "lr", "norm/mutual_information", "norm/effective_clusters", "images_per_second",
                "data_wait_fraction", "data/skipped_images", "teacher_temperature", "momentum"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(5, 31, 5)), key
    assert [m.step for m in client.get_metric_history(run_id, "knn/teacher")] == [20, 30]

    artifacts = {a.path for folder in (None, "plots", "plots/cluster_prior", "plots/cluster_usage")
                 for a in client.list_artifacts(run_id, folder) if not a.is_dir}
    assert {"config.yaml", "results.json", "plots/training_curves.png"} <= artifacts
    assert {f"plots/{kind}/epoch_00{e}.png" for kind in ("cluster_prior", "cluster_usage")
            for e in (1, 2, 3)} <= artifacts
    assert any(a.startswith("config-resumed-") for a in artifacts)
    local = Path(client.download_artifacts(run_id, "plots/training_curves.png"))
    assert Image.open(local).format == "PNG"

    model = mlflow.pytorch.load_model(tags["rayssl.model_uri"])
    # each launch that finished registered its final backbone: two versions, both of this run
    assert [v.run_id for v in client.search_model_versions("name = 'resume-test'")] == [run_id, run_id]
    backbone, _ = rayssl.load_backbone(run_path, endpoint_url=endpoint)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), backbone(x), atol=1e-5)


@pytest.mark.parametrize("override, field", [
    ("data.fashion_mnist_dir=/nonexistent", "data.fashion_mnist_dir"),
    ("data.source=s3://no-such-bucket/shards", "data.source"),
    ("run.storage_path=s3://no-such-bucket/runs", "run.storage_path"),
    ("data.eval_source=/nonexistent/shards", "data.eval_source"),
    ("train.steps_per_epoch=1000", "train.steps_per_epoch"),
])
def test_bad_inputs_fail_before_training_with_one_line(ray_cluster, tmp_path, shard_cache,
                                                       override: str, field: str) -> None:
    cfg = tiny_config(tmp_path, shard_cache, f"bad-{uuid.uuid4().hex[:8]}", override)
    with pytest.raises(ConfigError) as err:
        pretrain(cfg)
    assert str(err.value).startswith(field) and "\n" not in str(err.value)
    assert not (tmp_path / cfg.run.name).exists()  # nothing started, nothing written
