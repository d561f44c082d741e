"""rayssl.tracking against real MLflow stores (SQLite here; the server in test_train_ray.py),
without Ray: run creation and continuation, redaction, failures that must not stop training."""

from __future__ import annotations

import json
import logging
import socket

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from rayssl import tracking
from rayssl.config import ConfigError, load_config, mask_uri
from rayssl.plots import curves_figure, prior_figure
from rayssl.train.step import ClusterUsage


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mask_uri_hides_passwords_only() -> None:
    assert mask_uri("https://alice:hunter2@mlflow.example:5000/x") == "https://alice:***@mlflow.example:5000/x"
    assert mask_uri("postgresql://u:p%40ss@db/mlflow") == "postgresql://u:***@db/mlflow"
    assert mask_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert mask_uri("s3://bucket/key:with@sign") == "s3://bucket/key:with@sign"


def test_unreachable_server_is_a_clear_error_or_a_warning(tmp_path, caplog) -> None:
    uri = f"http://alice:hunter2@127.0.0.1:{closed_port()}"
    cfg = load_config(None, [f"tracking.uri={uri}", f"run.storage_path={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        tracking.start(cfg, str(tmp_path / "run"))
    message = str(err.value)
    assert message.startswith("tracking.uri: cannot use MLflow at http://alice:***@127.0.0.1:")
    assert "hunter2" not in message and "\n" not in message and "tracking.required=false" in message

    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.required=false"])
    with caplog.at_level(logging.WARNING, logger="rayssl.tracking"):
        assert tracking.start(cfg, str(tmp_path / "run")) is None
    assert "training continues without tracking" in caplog.text and "hunter2" not in caplog.text


def test_a_relaunch_continues_the_run_stored_in_its_checkpoint(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = [f"tracking.uri={uri}", "tracking.experiment=relaunch", "data.secret_access_key=s3cr3t-value",
            "data.access_key_id=AKIAEXAMPLE", "data.endpoint_url=http://minio:pw0rd@127.0.0.1:9000"]
    run_path = tmp_path / "runs" / "r1"
    first = tracking.start(load_config(None, [*base, "train.epochs=2"]), str(run_path))
    client = MlflowClient(uri)
    run = client.get_run(first.run_id)
    assert run.data.params["objective.mode"] == "prior" and run.data.params["train.epochs"] == "2.0"
    assert run.data.params["data.secret_access_key"] == "***"
    assert run.data.params["data.endpoint_url"] == "http://minio:***@127.0.0.1:9000"
    assert run.data.tags["rayssl.run_path"] == str(run_path) and run.data.tags["device"] == "cpu"
    experiment = client.get_experiment(first.experiment_id)
    assert experiment.artifact_location == str(tmp_path / "mlartifacts")  # absolute, beside the store

    # no checkpoint yet: a relaunch is a new run
    second = tracking.start(load_config(None, [*base, "train.epochs=2"]), str(run_path))
    assert second.run_id != first.run_id
    # a checkpoint names the first run: the relaunch continues it and records what changed
    (run_path / "checkpoint_000001").mkdir(parents=True)
    (run_path / "checkpoint_000001" / tracking.RUN_FILE).write_text(json.dumps(tracking.checkpoint_record(first)))
    third = tracking.start(load_config(None, [*base, "train.epochs=3"]), str(run_path))
    assert third.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.data.params["train.epochs"] == "2.0" and run.data.tags["resumed.train.epochs"] == "3.0"
    files = {a.path for a in client.list_artifacts(first.run_id)}
    assert "config.yaml" in files and any(f.startswith("config-resumed-") for f in files)

    store = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"s3cr3t-value" not in store and b"AKIAEXAMPLE" not in store and b"pw0rd" not in store


def test_run_logger_skips_logged_steps(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow_run = tracking.start(load_config(None, [f"tracking.uri={uri}"]), str(tmp_path / "run"))
    first = tracking.RunLogger(mlflow_run)
    for step in (2, 4):
        first.metrics(step, {"step": step, "loss": 1.0 / step, "knn/teacher": 0.5})
    again = tracking.RunLogger(mlflow_run)  # as after a restart from the checkpoint at step 2
    assert again.last_step == 4
    for step in (4, 6):
        again.metrics(step, {"step": step, "loss": 9.0})
    history = MlflowClient(uri).get_metric_history(mlflow_run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.25), (6, 9.0)]


def test_run_logger_never_raises_when_the_server_dies(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    lines: list[str] = []
    mlflow_run = tracking.MlflowRun(f"http://127.0.0.1:{closed_port()}", "0" * 32)
    logger = tracking.RunLogger(mlflow_run, say=lines.append, retry_seconds=0)
    logger.metrics(1, {"loss": 1.0})
    logger.epoch_plots(1, np.full(8, 1 / 8), np.arange(8))
    logger.results({"knn/teacher": 0.5}, 1)
    logger.end()
    assert len(lines) == 2 and lines[0].startswith("[rayssl] MLflow unreachable (") and "training continues" in lines[0]
    assert lines[1].startswith("[rayssl] MLflow unreachable: ") and "not delivered" in lines[1]  # no run folder given


def test_cluster_usage_is_the_teacher_marginal_and_argmax_counts() -> None:
    usage = ClusterUsage(4, torch.device("cpu"))
    logits = torch.randn(2, 5, 4)
    targets = torch.softmax(torch.randn(2, 5, 4), dim=-1)
    usage.add(logits, targets, 0.5)
    usage.add(logits, targets, 0.5)
    prior, assigned = usage.collect()
    expected = torch.softmax(logits.flatten(0, 1) / 0.5, dim=-1).mean(0)
    assert np.allclose(prior, expected.numpy(), atol=1e-6) and prior.sum() == pytest.approx(1.0)
    assert assigned.tolist() == (2 * torch.bincount(targets.flatten(0, 1).argmax(-1), minlength=4)).tolist()
    assert usage.collect()[1].sum() == 0  # reset for the next epoch


def test_figures_render(tmp_path) -> None:
    collapsed = np.r_[1.0 - 1e-6 * 63, np.full(63, 1e-6)]
    prior_figure(collapsed, "collapsed").savefig(tmp_path / "prior.png")
    curves_figure({"loss": [(2, 3.0), (1, 4.0)], "raw/mutual_information": [(1, 0.1)]}, "t").savefig(
        tmp_path / "curves.png")
    assert all((tmp_path / f).stat().st_size > 5000 for f in ("prior.png", "curves.png"))
