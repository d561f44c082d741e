"""A run that cannot make progress says so (real Ray): Ray Data tasks that fit on no node, and a
local cluster that died and left its address file behind."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest
from PIL import Image

from rayssl.data.shards import MANIFEST
from rayssl.train.launch import local_cluster, pretrain
from rayssl.train.watchdog import StallError
from test_train_ray import ROOT, tiny_config


def test_data_tasks_that_fit_nowhere_fail_the_run_with_the_pending_demand(ray_cluster, shard_cache, tmp_path) -> None:
    """The session cluster has 4 CPUs; two 1.75-CPU workers leave 0.5, and each Ray Data task
    asks for 1: nothing reads the shards. Within run.stall_timeout the run fails with one line
    naming the demand and the field to change, and its MLflow run is FAILED, not RUNNING."""
    from mlflow.tracking import MlflowClient

    name = f"stall-{uuid.uuid4().hex[:6]}"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(tmp_path, shard_cache, name, "scaling.cpus_per_worker=1.75", "data.cpus_per_task=1",
                      "run.stall_timeout=8", "eval.baselines=false", "data.decode_on=worker",
                      "tracking.log_model=false", f"tracking.uri={uri}", f"tracking.experiment={name}")
    with pytest.raises(StallError) as err:
        pretrain(cfg)
    line = str(err.value)
    assert "\n" not in line and line.startswith("[rayssl] stalled: worker ")
    assert ("Ray Data's tasks need 1 CPU each" in line and "no node has 1 CPU free (at most 0.5): lower "
            "data.cpus_per_task (to 0.5)" in line and line.endswith("no checkpoint was saved")), line
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_dead_local_cluster_address_gives_a_fresh_ray_and_one_line(ray_cluster, tmp_path) -> None:
    """``ray_current_cluster`` names a cluster that is gone (its port refuses): a job starts a fresh
    local Ray and says so in one line, instead of Ray's traceback."""
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    short = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    try:
        os.makedirs(f"{short}/ray")
        with open(f"{short}/ray/ray_current_cluster", "w") as f:
            f.write(dead)
        (tmp_path / "imgs" / "a").mkdir(parents=True)
        Image.new("L", (8, 8), 128).save(tmp_path / "imgs" / "a" / "x.png")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": short}
        done = subprocess.run([sys.executable, str(ROOT / "jobs/make_shards.py"), str(tmp_path / "imgs"),
                               str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=240)
        said = [line for line in done.stdout.splitlines() if "is gone" in line]
        assert done.returncode == 0, done.stderr[-2000:]
        assert said == [f"[rayssl] the local Ray cluster named in {short}/ray/ray_current_cluster ({dead}) is gone: "
                        "starting a fresh one (`ray stop` or removing that file silences this)"]
        assert (tmp_path / "out" / MANIFEST).exists()
    finally:  # the job's own Ray stopped when it exited (never `ray stop`: it stops every cluster here)
        shutil.rmtree(short, ignore_errors=True)


def test_local_cluster_tells_a_live_address_from_a_stale_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert local_cluster() == (None, None)
    (tmp_path / "ray").mkdir()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        (tmp_path / "ray" / "ray_current_cluster").write_text(live + "\n")
        assert local_cluster() == (live, None)
    assert local_cluster() == (None, live)  # closed: nothing answers there now
