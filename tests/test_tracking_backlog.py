"""Tracking outages lose nothing (``rayssl.tracking_backlog``), against a real ``mlflow server``
on 127.0.0.1 that the tests stop and start again on the same port and backend store; no Ray.

An outage mid-run: every point, param, tag and artifact arrives exactly once with its own step
and logging time. An outage through ``end()``: the backlog is written to the run folder and
``jobs/sync_tracking.py`` replays it completely, model included; a second sync adds nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from rayssl import report, tracking
from rayssl.config import ModelConfig, load_config
from rayssl.models import build_backbone
from rayssl.tracking_backlog import DIR, Backlog, RunFolder, keep_text, pending

from mlflow_server import MlflowServer, free_port  # tests/mlflow_server.py

ROOT = Path(__file__).resolve().parents[1]
SYNC = [sys.executable, str(ROOT / "jobs" / "sync_tracking.py")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture(autouse=True)
def quick_mlflow(monkeypatch) -> None:
    """A dead server costs one refused connection per try, not MLflow's retries with backoff."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def new_run(server: MlflowServer, name: str) -> tracking.MlflowRun:
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("backlog") or client.get_experiment(client.create_experiment("backlog"))
    return tracking.MlflowRun(server.uri, client.create_run(experiment.experiment_id, run_name=name).info.run_id,
                              experiment.experiment_id)


def point(step: int) -> dict:
    return {"step": step, "loss": 10.0 - step, "lr": 0.001 * step}


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, folder):
        out += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(out)


@pytest.mark.slow  # a real mlflow server, stopped and started
def test_an_outage_mid_run_loses_nothing_and_every_step_arrives_once(server, tmp_path) -> None:
    mlflow_run = new_run(server, "outage")
    run = tmp_path / "run"
    lines: list[str] = []
    logger = tracking.RunLogger(mlflow_run, say=lines.append, retry_seconds=0.3,
                                run_folder=RunFolder(None, str(run), str(run)))
    logged: dict[int, float] = {}
    for step in (1, 2, 3):
        logger.metrics(step, point(step))
    server.stop()
    for step in range(4, 10):
        logged[step] = time.time()
        logger.metrics(step, point(step))
    logger.param("train.total_steps", 42)
    logger.tag("rayssl.collapse", "collapse at step 7; see http://alice:pw0rd@host/x")
    logger.epoch_plots(1, np.full(8, 1 / 8), np.arange(8))
    logger.results({"knn/teacher": 0.5, "train_seconds": 12.5, "budget": {"total_steps": 42}}, 9)
    (tmp_path / "note.txt").write_text("a note")
    logger.artifact(tmp_path / "note.txt", "notes")
    assert len(lines) == 1 and lines[0].startswith("[rayssl] MLflow unreachable (")
    assert lines[0].endswith("points kept, delivered when it answers")

    server.start()
    restarted = time.time()
    step = 9
    while not any("MLflow back" in line for line in lines) and step < 60:  # the next logged steps deliver it
        step += 1
        logger.metrics(step, point(step))
        time.sleep(0.2)
    logger.curves("outage")
    logger.end()

    assert len(lines) == 2 and re.fullmatch(r"\[rayssl\] MLflow back: \d+ points delivered", lines[1]), lines
    client = MlflowClient(server.uri)
    for key in ("loss", "lr"):
        points = history(client, mlflow_run.run_id, key)
        assert [s for s, _, _ in points] == list(range(1, step + 1))  # every step, once, in order
        assert [v for _, v, _ in points] == [point(s)[key] for s in range(1, step + 1)]
    for s, _, stamp in history(client, mlflow_run.run_id, "loss"):
        if s in logged:  # stamped when logged during the outage, not when delivered
            assert logged[s] * 1000 - 5 <= stamp < restarted * 1000
    assert [(s, v) for s, v, _ in history(client, mlflow_run.run_id, "knn/teacher")] == [(9, 0.5)]
    data = client.get_run(mlflow_run.run_id)
    assert data.data.params["train.total_steps"] == "42"
    assert data.data.tags["rayssl.collapse"] == "collapse at step 7; see http://alice:***@host/x"
    assert artifacts(client, mlflow_run.run_id) == [
        "notes/note.txt", "plots/cluster_prior/epoch_001.png", "plots/cluster_usage/epoch_001.png",
        "plots/training_curves.png", "results.json"]
    got = json.loads(Path(client.download_artifacts(mlflow_run.run_id, "results.json", str(tmp_path))).read_text())
    assert got == {"knn/teacher": 0.5, "train_seconds": 12.5, "budget": {"total_steps": 42}}
    assert data.info.status == "FINISHED"
    assert not (run / DIR).exists()  # delivered: nothing kept


@pytest.mark.slow  # real mlflow servers, stopped and started
def test_a_server_down_at_the_end_leaves_a_backlog_that_sync_replays_once(server, tmp_path) -> None:
    plain = new_run(server, "down-at-end")
    secret = plain.uri.replace("http://", "http://alice:pw0rd@")  # recorded masked, never in clear
    mlflow_run = tracking.MlflowRun(secret, plain.run_id, plain.experiment_id)
    run = tmp_path / "runs" / "r1"
    lines: list[str] = []
    model_config = ModelConfig(width=4).model_dump()
    logger = tracking.RunLogger(mlflow_run, say=lines.append, retry_seconds=0.3,
                                run_folder=RunFolder(None, str(run), str(run)), model_config=model_config)
    logger.metrics(1, point(1))
    logger.metrics(2, point(2))
    server.stop()
    for step in (3, 4, 5):
        logger.metrics(step, point(step))
    logger.param("train.total_steps", 5)
    logger.tag("rayssl.stopped", "token at http://x/?token=s3cr3t")
    logger.epoch_plots(1, np.full(8, 1 / 8), np.arange(8))
    logger.results({"knn/teacher": 0.75}, 5)
    logger.curves("down at the end")
    torch.manual_seed(0)
    backbone, _ = build_backbone("convnet4", 1, 28, True, 4)
    backbone.eval()
    example = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    logger.model(backbone, example, {"input": "images", "image_size": 28, "channels": 1, "mean": [0.5], "std": [0.25]})
    logger.end()

    assert len(lines) == 2 and lines[0].startswith("[rayssl] MLflow unreachable (")
    assert lines[1].startswith("[rayssl] MLflow still unreachable at the end: ") and "and the model" in lines[1]
    assert lines[1].endswith(f"kept in {run}/{DIR}; deliver them with: python jobs/sync_tracking.py {run}")
    kept = sorted((run / DIR).glob("*.jsonl"))
    assert len(kept) == 1 and [Path(p).name for p in pending(RunFolder.of(str(run)))] == [kept[0].name]
    entries = [json.loads(line) for line in kept[0].read_text().splitlines()]
    assert entries[0]["kind"] == "run" and entries[0]["run_id"] == plain.run_id
    assert entries[0]["uri"] == plain.uri.replace("http://", "http://alice:***@") and entries[0]["dropped"] == 0
    assert entries[-1] == {"kind": "status", "status": "FINISHED"}  # the status after everything else
    assert [(e["step"], e["values"]) for e in entries if e["kind"] == "metrics"] == [
        *((s, {k: v for k, v in point(s).items() if k != "step"}) for s in (3, 4, 5)), (5, {"knn/teacher": 0.75})]
    model = next(e for e in entries if e["kind"] == "model")
    weights = torch.load(kept[0].with_suffix("") / model["file"], weights_only=True)  # tensors only, no pickle
    assert all(torch.equal(weights["state_dict"][k], v) for k, v in backbone.state_dict().items())
    stored = b"".join(p.read_bytes() for p in (run / DIR).rglob("*") if p.is_file())
    assert b"pw0rd" not in stored and b"s3cr3t" not in stored
    text = report.render({"history": []}, load_config(None, ["run.name=r1"]).redacted(), backlog=str(run))
    assert f"python jobs/sync_tracking.py {run}\n" in text and f"`{run}/{DIR}`" in text

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(plain.run_id).info.status == "RUNNING"  # FINISHED waits for the backlog
    assert [s for s, _, _ in history(client, plain.run_id, "loss")] == [1, 2]
    first = subprocess.run([*SYNC, str(run), "--tracking-uri", server.uri], capture_output=True, text=True,
                           timeout=180)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith(f"delivered to MLflow run {plain.run_id} at {server.uri}: metric points 7, ")
    assert first.stdout.rstrip().endswith("model 1; status FINISHED")

    data = client.get_run(plain.run_id)
    assert data.info.status == "FINISHED"
    for key in ("loss", "lr"):
        assert [s for s, _, _ in history(client, plain.run_id, key)] == [1, 2, 3, 4, 5]
    stamps = {e["step"]: e["timestamp"] for e in entries if e["kind"] == "metrics" and "loss" in e["values"]}
    assert {s: t for s, _, t in history(client, plain.run_id, "loss") if s in stamps} == stamps
    assert data.data.params["train.total_steps"] == "5"
    assert data.data.tags["rayssl.stopped"] == "token at http://x/?token=***"
    assert {"plots/cluster_prior/epoch_001.png", "plots/cluster_usage/epoch_001.png", "plots/training_curves.png",
            "results.json"} <= set(artifacts(client, plain.run_id))
    import mlflow.artifacts
    import mlflow.pytorch

    logged = client.get_logged_model(data.data.tags["rayssl.model_uri"].removeprefix("models:/"))
    assert logged.source_run_id == plain.run_id and logged.name == "backbone"
    local = mlflow.artifacts.download_artifacts(logged.artifact_location, dst_path=str(tmp_path / "model"),
                                                tracking_uri=server.uri)
    loaded = mlflow.pytorch.load_model(local)
    with torch.no_grad():
        assert torch.allclose(loaded(torch.from_numpy(example)), backbone(torch.from_numpy(example)))
    models = client.search_logged_models([plain.experiment_id])
    assert len(models) == 1  # the only model of this experiment, logged once
    before = {key: history(client, plain.run_id, key) for key in ("loss", "lr", "knn/teacher")}

    again = subprocess.run([*SYNC, str(run / DIR), "--tracking-uri", server.uri], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("nothing to deliver"), again.stdout + again.stderr
    assert {key: history(client, plain.run_id, key) for key in before} == before
    assert len(client.search_logged_models([plain.experiment_id])) == len(models)
    assert pending(RunFolder.of(str(run))) == []


def test_sync_says_in_one_line_what_is_missing(tmp_path) -> None:
    helped = subprocess.run([*SYNC, "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--tracking-uri" in helped.stdout and "tracking_backlog" in helped.stdout

    missing = subprocess.run([*SYNC, str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(f"error: {tmp_path / 'nope'}: no {DIR}/ folder here")

    run = tmp_path / "run"
    closed = f"http://127.0.0.1:{free_port()}"
    keep_text(RunFolder(None, str(run), str(run)), "0" * 32, closed, "report.md", "# report")
    down = subprocess.run([*SYNC, str(run)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MLFLOW_TRACKING_URI": closed})
    assert down.returncode == 1 and down.stderr.count("\n") == 1, down.stderr
    assert down.stderr.startswith(f"error: cannot use MLflow at {closed} (")
    assert down.stderr.rstrip().endswith("nothing delivered, the backlog stays: run this again when it answers")
    assert len(pending(RunFolder.of(str(run)))) == 1


def test_the_backlog_is_bounded(tmp_path) -> None:
    points = Backlog(max_points=10)
    metrics = [{"kind": "metrics", "step": s, "timestamp": 0, "values": {"a": 1.0, "b": 2.0, "c": 3.0}}
               for s in range(4)]
    assert [points.add(m) for m in metrics] == [True, True, True, False]  # 9 points fit, 12 would not
    assert points.points == 9 and points.dropped == 3
    assert points.add({"kind": "param", "key": "k", "value": "v"})  # params, tags, status: always kept
    assert points.add({"kind": "status", "status": "FINISHED"})
    assert len(points) == 5 and points.dropped == 3

    files = Backlog(max_bytes=1000)
    for name, size, kept in (("big.bin", 2000, False), ("small.bin", 600, True), ("second.bin", 600, False)):
        relative = files.write(name, lambda path: path.write_bytes(b"x" * size))
        assert files.add({"kind": "artifact", "file": relative, "path": ""}) is kept, name
    assert files.bytes == 600 and files.dropped == 2
    assert [p.name for p in files.spool.rglob("*.bin")] == ["small.bin"]  # dropped files are removed
    files.close()
    assert not files.spool.exists()

    # a RunLogger with a full backlog says so once and keeps the first points
    lines: list[str] = []
    run = tmp_path / "run"
    mlflow_run = tracking.MlflowRun(f"http://127.0.0.1:{free_port()}", "0" * 32)
    logger = tracking.RunLogger(mlflow_run, say=lines.append, retry_seconds=60, backlog=Backlog(max_points=4),
                                run_folder=RunFolder(None, str(run), str(run)))
    for step in range(1, 11):
        logger.metrics(step, {"loss": float(step)})
    logger.end()
    assert sum("backlog full" in line for line in lines) == 1
    entries = [json.loads(line) for path in (run / DIR).glob("*.jsonl") for line in path.read_text().splitlines()]
    assert [e["step"] for e in entries if e["kind"] == "metrics"] == [1, 2, 3, 4] and entries[0]["dropped"] == 6
