"""Faults on real Ray runs: a worker killed mid-run, NaN steps that fail the run on the driver.
(The collapse alarm and the NaN stop inside the run are tested without Ray: test_train_run.py.)"""

from __future__ import annotations

import os
import posixpath
import re
import signal
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from rayssl import checkpoint as checkpoints
from rayssl.train.launch import pretrain
from rayssl.train.step import NonFiniteError
from test_train_ray import TINY_RUN, tiny_config


def final_state(run_dir: Path) -> dict:
    found = checkpoints.latest_intact(pyarrow.fs.LocalFileSystem(), str(run_dir))
    assert found is not None, run_dir
    return found[1]


def assert_bitwise_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if a.pid]


def test_killed_worker_restarts_from_checkpoint_and_ends_bitwise_equal(ray_cluster, tmp_path, shard_cache,
                                                                       tiny_run) -> None:
    """SIGKILL one of two workers mid-run: Ray Train restarts the group from the newest
    checkpoint and the run ends bitwise equal to the same run without the fault (the shared
    ``tiny_run``: CPU, data.deterministic), weights, optimizer, prior state and all; MLflow has
    each step once."""
    import mlflow

    common = (*TINY_RUN, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "eval.gallery_clusters=0")  # not read
    clean_dir, clean = tiny_run
    assert "resumed_from_step" not in clean

    name = f"killed-{uuid.uuid4().hex[:6]}"
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(
        pretrain(tiny_config(tmp_path, shard_cache, name, *common))))
    thread.start()
    deadline, killed = time.time() + 240, None
    while killed is None and time.time() < deadline and thread.is_alive():
        if list((tmp_path / name).glob(f"checkpoint_*/{checkpoints.MANIFEST_FILE}")):
            workers = train_worker_pids()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "no checkpoint appeared while the run was going"
    assert not thread.is_alive() and outcome, "the run did not finish after the worker was killed"

    resumed = outcome["resumed_from_step"]
    assert 3 <= resumed < 12 and resumed % 3 == 0
    assert outcome["history"][0]["step"] == resumed + 3  # at most one checkpoint interval recomputed
    assert outcome["history"][-1]["step"] == 12
    a, b = final_state(clean_dir), final_state(tmp_path / name)
    assert a["step"] == b["step"] == 12
    for key in ("student", "teacher", "optimizer", "objective", "rng", "data_position"):
        assert_bitwise_equal(a[key], b[key], key)
    assert not torch.allclose(b["objective"]["log_prior_ema"],
                              torch.full_like(b["objective"]["log_prior_ema"], -torch.log(torch.tensor(32.0))))

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(3, 13, 3))


def test_nan_steps_are_skipped_up_to_the_bound_then_stop_the_run(ray_cluster, tmp_path, shard_cache) -> None:
    """An absurd learning rate makes the weights overflow: the NaN steps are skipped up to
    train.skip_nonfinite, then the run stops with the step and the term; every checkpoint left
    is finite and older than the stop; the MLflow run is FAILED and says why."""
    import mlflow

    name = f"nan-{uuid.uuid4().hex[:6]}"
    cfg = tiny_config(tmp_path, shard_cache, name, "scaling.num_workers=1", "optim.lr=1e30",
                      "train.log_every=1", "train.checkpoint_every=1", "train.skip_nonfinite=2",
                      "eval.baselines=false", "train.epochs=2", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(NonFiniteError) as err:
        pretrain(cfg)
    message = str(err.value)
    assert message.startswith("non-finite ") and "\n" not in message
    assert "nothing saved after the checkpoint of step" in message or "no checkpoint was saved" in message
    saved = final_state(tmp_path / name)
    assert saved["step"] < 12
    for part in ("student", "teacher"):
        assert all(t.isfinite().all() for t in saved[part].values() if t.is_floating_point())
    # NaN losses skipped twice and stopped at the third, or weights already inf at a checkpoint
    assert re.match(r"non-finite (loss at step \d+ \(train.skip_nonfinite=2, 3 seen\)|weights after step \d+);",
                    message), message

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("rayssl").experiment_id],
                             f"tags.mlflow.runName = '{name}'")[0]
    assert run.info.status == "FAILED" and run.data.tags["rayssl.stopped"].startswith("non-finite")



@pytest.fixture
def small_disk(tmp_path: Path):
    """A 1,000 KiB tmpfs: room for the tiny run's first checkpoint (about 650 KB), not its second."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_stops_the_run_keeps_the_checkpoint_and_a_relaunch_resumes(small_disk, shard_cache,
                                                                               tmp_path) -> None:
    """run.storage_path on a disk that fills at the second checkpoint (step 6): the run stops with
    one line naming the folder, the step and the space, the checkpoint of step 3 intact and nothing
    left of the one that did not fit; the MLflow run is FAILED. Once the disk has room, the same
    run.name resumes from step 3, ends at step 12, and the MLflow run is the same one, FINISHED."""
    import subprocess

    import mlflow

    name, store = f"full-{uuid.uuid4().hex[:6]}", f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(small_disk, shard_cache, name, *TINY_RUN, f"tracking.uri={store}",
                      "eval.every_epochs=null", "eval.gallery_clusters=0")  # nothing here reads them
    with pytest.raises(checkpoints.DiskFull) as err:
        pretrain(cfg)
    message, run_dir = str(err.value), small_disk / name
    assert "\n" not in message and message.startswith(f"{run_dir}: no space left on its disk for the checkpoint "
                                                      "of step 6 ("), message
    assert "the checkpoint of step 3 is intact" in message and message.endswith(f"run.name={name} to resume")
    fs = pyarrow.fs.LocalFileSystem()
    folders = checkpoints.candidates(fs, str(run_dir))  # a folder without its manifest would be listed too
    assert len(folders) == 1 and posixpath.basename(folders[0]).endswith("_step0000003"), folders
    assert final_state(run_dir)["step"] == 3
    client = mlflow.MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("rayssl").experiment_id],
                             f"tags.mlflow.runName = '{name}'")[0]
    assert run.info.status == "FAILED" and run.data.tags["rayssl.stopped"].startswith(f"{run_dir}: no space left")

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    out = pretrain(cfg)
    assert out["resumed_from_step"] == 3 and out["history"][-1]["step"] == 12
    assert out["mlflow_run_id"] == run.info.run_id and client.get_run(run.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # one point per logged step, through both launches
