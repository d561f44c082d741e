"""Authenticated MLflow, client side, against a real ``mlflow server --app-name basic-auth`` on
127.0.0.1, without Ray: rayssl passes MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD to
MLflow and to rank 0, a refusal stops the job in one line before Ray starts, and the password
never reaches the output, the run or the store. (Authenticated Ray: tests/test_stop.py.)"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from mlflow_server import MlflowServer
from rayssl import tracking
from rayssl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
ADMIN = ("alice", f"pw-{uuid.uuid4().hex}")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-auth"), admin=ADMIN)
    server.start()
    yield server
    server.stop()


def login(monkeypatch, user: str | None, password: str | None) -> None:
    """This process's MLflow credentials (restored after the test, also when rayssl sets them)."""
    for name, value in zip(tracking.CREDENTIALS, (user, password)):
        monkeypatch.setenv(name, value or "")
        if value is None:
            monkeypatch.delenv(name)


def config(server: MlflowServer, tmp_path: Path, *overrides: str):
    return load_config(None, [f"tracking.uri={server.uri}", f"run.storage_path={tmp_path}", *overrides])


@pytest.mark.slow  # a real mlflow server with its auth app
def test_right_credentials_pass_the_check_and_reach_rank_0_but_never_the_run(
        auth_server, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    login(monkeypatch, *ADMIN)
    cfg = config(auth_server, tmp_path, "tracking.experiment=auth-right", "tracking.log_model=false")
    tracking.check_access(cfg)
    mlflow_run = tracking.start(cfg, str(tmp_path / "run"))
    assert mlflow_run.credentials == dict(zip(tracking.CREDENTIALS, ADMIN)) and ADMIN[1] not in repr(mlflow_run)

    login(monkeypatch, None, None)  # rank 0 on a node started without them: only what the driver sent
    lines: list[str] = []
    logger = tracking.RunLogger(pickle.loads(pickle.dumps(mlflow_run)), say=lines.append, retry_seconds=0)
    logger.metrics(1, {"loss": 0.5})
    logger.end()
    assert lines == []
    login(monkeypatch, *ADMIN)
    client = MlflowClient(auth_server.uri)
    run = client.get_run(mlflow_run.run_id)
    assert run.info.status == "FINISHED" and [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.5]
    config_yaml = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert ADMIN[1] not in str(run.data.to_dictionary()) + Path(config_yaml).read_text()
    stored = [p for p in auth_server.root.rglob("*") if p.is_file() and p.name != "basic_auth.ini"]
    assert not any(ADMIN[1].encode() in p.read_bytes() for p in stored)  # the user store keeps a hash


def test_refusals_name_the_uri_and_the_user_never_the_password(auth_server, tmp_path, monkeypatch) -> None:
    wrong = f"pw-{uuid.uuid4().hex}"
    where = f"tracking.uri: MLflow at {auth_server.uri}"
    cases = [((None, None), "asks for credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
             (("alice", wrong), "refused the credentials (MLFLOW_TRACKING_USERNAME=alice): check MLFLOW_TRACKING_PASSWORD"),
             (("bob", wrong), "denied MLFLOW_TRACKING_USERNAME=bob access: ask its admin for a permission on the experiment")]
    login(monkeypatch, *ADMIN)
    auth_server.add_user("bob", wrong)  # no permission anywhere (default_permission = NO_PERMISSIONS)
    tracking.start(config(auth_server, tmp_path, "tracking.experiment=auth-refused"), str(tmp_path / "run"))
    for (user, password), said in cases:
        login(monkeypatch, user, password)
        for check in (tracking.check_access,  # before Ray starts; then start's own check, required or not
                      lambda cfg: tracking.start(cfg, str(tmp_path / "run"))):
            cfg = config(auth_server, tmp_path, "tracking.experiment=auth-refused", "tracking.required=false")
            with pytest.raises(ConfigError) as err:
                check(cfg)
            assert str(err.value) == f"{where} {said}"


@pytest.mark.slow  # a real mlflow server with its auth app
def test_a_wrong_password_stops_pretrain_in_one_line_before_ray_starts(auth_server, tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    wrong = f"pw-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=wrong, RAY_TMPDIR=str(tmp_path / "ray"))
    job = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain.py"), f"tracking.uri={auth_server.uri}",
                          f"run.storage_path={tmp_path / 'runs'}", "tracking.experiment=auth-wrong"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert (job.returncode, job.stdout) == (2, ""), job.stdout + job.stderr
    assert job.stderr == (f"error: tracking.uri: MLflow at {auth_server.uri} refused the credentials "
                          "(MLFLOW_TRACKING_USERNAME=alice): check MLFLOW_TRACKING_PASSWORD\n")
    assert wrong not in job.stdout + job.stderr
    assert not (tmp_path / "ray").exists()  # Ray never started
    login(monkeypatch, *ADMIN)
    assert MlflowClient(auth_server.uri).get_experiment_by_name("auth-wrong") is None  # no run, nor its experiment


@pytest.mark.slow  # a real mlflow server with its auth app
def test_a_sweep_s_trials_get_the_driver_s_credentials_through_the_parent_run(auth_server, tmp_path, monkeypatch) -> None:
    """A Tune trial may run on a node started without MLFLOW_TRACKING_*: the sweep's parent run
    carries the driver's, as ``start``'s run does for rank 0 (pickled into the trial, never in a
    runtime env). ``run_trial`` without them stops at its MLflow check; with the parent's alone
    that check passes, and the trial stops at the next one (its data is missing here: no Ray)."""
    from rayssl.tune import run_trial

    login(monkeypatch, *ADMIN)
    base = config(auth_server, tmp_path, "tracking.experiment=auth-sweep", "data.fashion_mnist_dir=/nonexistent")
    parent = tracking.start_parent(base, "auth-sweep", {"model.width": 8}, None)
    assert parent.credentials == dict(zip(tracking.CREDENTIALS, ADMIN)) and ADMIN[1] not in repr(parent)

    login(monkeypatch, None, None)  # the trial's process, on a node started without them
    sweep = {"name": "auth-sweep", "storage_path": str(tmp_path / "sweeps")}
    trial = dict(base=base.model_dump(), sweep=sweep, metric="loss")
    with pytest.raises(ConfigError, match=r"^tracking.uri: .* asks for credentials"):
        run_trial({}, **trial, parent_run=None)
    with pytest.raises(ConfigError, match=r"^data.fashion_mnist_dir: "):
        run_trial({}, **trial, parent_run=pickle.loads(pickle.dumps(parent)))
