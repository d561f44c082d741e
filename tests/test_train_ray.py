"""Integration: real Ray Train runs on a small Fashion-MNIST slice (2 gloo workers)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from rayssl.checkpoint import CHECKPOINT_FILE, candidates, load_intact
from rayssl.config import ConfigError, load_config
from rayssl.train.launch import pretrain

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, shards: list[str], name: str, *extra: str):
    return load_config(ROOT / "configs/fashion_mnist.yaml", [
        *shards, "data.train_limit=1024", "data.test_limit=256",
        "model.width=8", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
        "objective.num_clusters=32", "train.batch_size=32", "train.steps_per_epoch=6",
        "train.log_every=2", "train.checkpoint_every=6", "optim.lr=0.005", "optim.warmup_epochs=0",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        f"run.storage_path={tmp_path}", f"run.name={name}", *extra])


def checkpoints(run_dir: Path) -> list[dict]:
    """The intact checkpoints of a run folder, oldest step first."""
    fs = pyarrow.fs.LocalFileSystem()
    states = [load_intact(fs, folder) for folder in candidates(fs, str(run_dir))]
    return [s for s in reversed(states) if s is not None]


FAKE_KEY, FAKE_SECRET = "AKIAFAKE7RAYSSL0TEST", "fake+Secret/Key0of0the0rayssl0tests"


def test_two_workers_train_checkpoint_and_resume(ray_cluster, tmp_path, shard_cache, mlflow_server,
                                                 monkeypatch) -> None:
    """Two launches of one run: the second resumes the first's newest *intact* checkpoint (the
    last one is truncated on purpose in between) and continues its MLflow run."""
    name = f"it-{uuid.uuid4().hex[:8]}"
    uri, store = mlflow_server
    cfg = tiny_config(tmp_path, shard_cache, name, "train.epochs=2", "objective.prior_momentum=0.9",
                      f"tracking.uri={uri}", "tracking.experiment=resume-test", "tracking.register_as=resume-test",
                      f"data.access_key_id={FAKE_KEY}", f"data.secret_access_key={FAKE_SECRET}")
    first = pretrain(cfg)

    losses = [m["loss"] for m in first["history"]]
    assert [m["step"] for m in first["history"]] == [2, 4, 6, 8, 10, 12]
    assert losses[-1] < losses[0]
    assert 0 <= first["knn/teacher"] <= 1 and 0 <= first["knn/raw_pixels"] <= 1
    assert "resumed_from_step" not in first
    saved = checkpoints(tmp_path / name)
    assert [c["step"] for c in saved] == [6, 12]
    prior_at_12 = saved[-1]["objective"]["log_prior_ema"]
    uniform = torch.full_like(prior_at_12, -torch.log(torch.tensor(32.0)))
    assert not torch.allclose(prior_at_12, uniform)  # the EMA moved: there is state to restore

    # Truncate the newest checkpoint (a crash while copying it), then relaunch with the same run
    # name and a longer schedule: resumes at step 6, the newest intact one.
    newest = candidates(pyarrow.fs.LocalFileSystem(), str(tmp_path / name))[0]
    data = Path(newest, CHECKPOINT_FILE).read_bytes()
    Path(newest, CHECKPOINT_FILE).write_bytes(data[:len(data) // 2])
    second = pretrain(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})}))
    assert second["resumed_from_step"] == 6
    assert [m["step"] for m in second["history"]] == [8, 10, 12, 14, 16, 18]
    assert second["knn/raw_pixels"] == first["knn/raw_pixels"]  # baselines carried, not recomputed
    final = checkpoints(tmp_path / name)[-1]
    assert final["step"] == 18
    assert not torch.equal(final["objective"]["log_prior_ema"], prior_at_12)

    assert second["mlflow_run_id"] == first["mlflow_run_id"] == final["tracking"]["run_id"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve in the default store
    check_mlflow_run(uri, "resume-test", first["mlflow_run_id"], tmp_path / name)
    logs = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    for folder in (Path(store), tmp_path, logs):  # the whole MLflow store, checkpoints, Ray's logs
        for path in (p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            assert FAKE_SECRET.encode() not in data and FAKE_KEY.encode() not in data, path


def check_mlflow_run(uri: str, experiment: str, run_id: str, run_dir: Path) -> None:
    """The MLflow run of the resume test: params, one metric point per step, plots, model."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from PIL import Image

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
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(2, 19, 2)), key
    assert [m.step for m in client.get_metric_history(run_id, "knn/teacher")] == [12, 18]

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
    backbone, _ = rayssl.load_backbone(str(run_dir))
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
