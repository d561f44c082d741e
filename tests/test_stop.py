"""A stopped job stops cleanly (``rayssl.train.stop``): the driver's signal handling without Ray,
then a real ``ray job submit`` / ``ray job stop`` against a ``ray start --head`` of its own, with
token authentication (``RAY_AUTH_MODE=token``, its own token file): a submit without the token is
refused, and the job (``jobs/pretrain.py`` joining the cluster from inside it) runs with it.

The head runs in the multi-node tier's pytest process (``make test``: never beside the session's
Ray cluster), on loopback, on free ports, in its own temporary folder, and its process group is
ended at the end (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import pytest

from rayssl import checkpoint as checkpoints
from rayssl.train.stop import StopSignals, Unfinished, exit_code, grace

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


# ---------------------------------------------------------------------- the driver, without Ray
def test_the_wait_ends_before_ray_job_stop_kills_the_job(monkeypatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)  # not under `ray job submit`
    assert grace(20.0) == (20.0, "run.stop_timeout", None)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("RAY_JOB_STOP_WAIT_TIME_S", raising=False)  # Ray's default: SIGKILL after 3 s
    seconds, bound, warning = grace(20.0)
    assert (seconds, bound) == (1.0, "RAY_JOB_STOP_WAIT_TIME_S=3") and "\n" not in warning
    assert warning.startswith("[rayssl] WARNING run.stop_timeout: ")
    assert warning.endswith("""--runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}}'""")
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "30")
    assert grace(20.0) == (20.0, "run.stop_timeout", None)


def test_a_signal_becomes_a_stop_request_within_a_bounded_wait() -> None:
    """The first signal is the request (``signal``), ``fit`` runs on to its end; out of time or at a
    second signal ``run`` gives up on it (``Unfinished``); the previous handlers always come back."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    lines: list[str] = []
    release = threading.Event()  # ends the fits left running
    try:
        signals = StopSignals(10.0, say=lines.append)

        def fit_that_stops():
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
            while signals.signal is None:  # what rank 0 reads from Ray's KV store
                time.sleep(0.01)
            return "checkpointed"

        assert signals.run(fit_that_stops) == "checkpointed" and signals.signal == "SIGINT"
        assert exit_code("SIGINT") == 130 and exit_code("SIGTERM") == 143
        assert lines == ["[rayssl] SIGINT: stopping after the current step with a checkpoint, within 10 s "
                         "(run.stop_timeout); a second signal exits at once"]
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

        signals, started = StopSignals(0.5, say=lines.append), time.monotonic()
        with pytest.raises(Unfinished) as err:
            signals.run(lambda: (os.kill(os.getpid(), signal.SIGTERM), release.wait(60)))
        assert not err.value.forced and signals.signal == "SIGTERM" and time.monotonic() - started < 5

        def twice():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)
            release.wait(60)

        signals, started = StopSignals(30.0, say=lines.append), time.monotonic()
        with pytest.raises(Unfinished) as err:
            signals.run(twice)
        assert err.value.forced and time.monotonic() - started < 5

        with pytest.raises(ZeroDivisionError):  # fit's own error, as it is
            StopSignals(1.0).run(lambda: 1 / 0)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

        inline: dict = {}  # outside the main thread (a Tune trial): no handlers, no key, fit inline
        thread = threading.Thread(target=lambda: inline.update(s=StopSignals(1.0)))
        thread.start()
        thread.join()
        assert inline["s"].key is None and inline["s"].run(lambda: 7) == 7
    finally:
        release.set()


# ---------------------------------------------------------------------- ray job submit / stop
@dataclass
class Head:
    address: str  # the dashboard, for `ray job`
    logs: Path
    env: dict  # the head's, and a client's that has its token
    token: str  # Ray's token authentication: RAY_AUTH_TOKEN_PATH in env names its file


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A ``ray start --head --block`` of this module's tests: loopback, free ports, its own temp folder
    (short: Ray's socket paths) with its own auth token, 4 logical CPUs; ended with its process group."""
    import ray

    if ray.is_initialized():  # a plain ``pytest``: the session's cluster is done by now (multinode runs last)
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="rs-stop-", dir="/tmp")
    gcs, dashboard, client, agent = _free_ports(4)
    token, token_file = secrets.token_hex(32), Path(temp) / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # Ray Train's controller takes one report per health check (2 s by default): every step is reported here
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=4", f"--object-store-memory={256 * 2**20}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats",
         f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(authorized(f"{address}/api/version", token), timeout=2).read()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not serve {address} within 90 s")
                time.sleep(0.5)
        yield Head(address, Path(temp) / "session_latest" / "logs", env, token)
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of its group left behind
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


def authorized(url: str, token: str) -> urllib.request.Request:
    return urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})


def tiny_job(small_fashion_mnist: str, root: Path, name: str) -> list[str]:
    """``jobs/pretrain.py`` on the small Fashion-MNIST: 16 steps of a tiny network on 2 workers,
    every step logged, no checkpoint before the end but the stop's."""
    return [sys.executable, str(ROOT / "jobs/pretrain.py"), f"data.fashion_mnist_dir={small_fashion_mnist}",
            f"data.cache_dir={root / 'cache'}", "data.train_limit=1024", "data.eval_limit=256",
            "train.time_budget=null", "train.epochs=1", "train.batch_size=32", "train.log_every=1",
            "train.checkpoint_every=1000", "optim.warmup_epochs=0", "model.width=8", "model.head_hidden_dim=64",
            "model.head_bottleneck_dim=32", "objective.num_clusters=32", "scaling.num_workers=2",
            "scaling.cpus_per_worker=1", "eval.baselines=false", "eval.precise_bn_images=0", "tracking.log_model=false",
            "eval.every_epochs=null", "eval.gallery_clusters=0",  # no online k-NN or galleries: nothing reads them
            f"run.storage_path={root / 'runs'}", f"run.name={name}"]


def ray_job(head: Head, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args[:1], "--address", head.address, *args[1:]], env=head.env,
                          capture_output=True, text=True, timeout=timeout)


def logged_steps(log: Path) -> list[int]:
    """The steps the driver's console has shown (one line per logged step without a terminal)."""
    if not log.exists():
        return []
    return [int(line.split()[2].split("/")[0]) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("[rayssl] step ")]


@pytest.mark.multinode  # a Ray cluster of its own: never beside the session's
def test_the_head_refuses_ray_job_submit_without_its_token(ray_head) -> None:
    """A client that sends no token (as the docs' ``RAY_AUTH_MODE=disabled`` had it) and one with
    another token: refused by the head, and nothing submitted. (The next test's submits carry the
    token, and its jobs run.)"""
    clients = {"Missing authentication token": {"RAY_AUTH_MODE": "disabled"},
               "Invalid authentication token": {"RAY_AUTH_TOKEN": secrets.token_hex(32)}}
    for refusal, client in clients.items():
        env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN_PATH"} | client
        submit = subprocess.run([RAY, "job", "submit", "--address", ray_head.address, "--submission-id=refused",
                                 "--", "python", "-c", "pass"], env=env, capture_output=True, text=True, timeout=120)
        said = submit.stdout + submit.stderr
        assert submit.returncode != 0 and refusal in said and ray_head.token not in said, said
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(authorized(f"{ray_head.address}/api/jobs/refused", ray_head.token), timeout=10)
    assert err.value.code == 404


@pytest.mark.multinode  # a Ray cluster of its own: never beside the session's
def test_ray_job_stop_checkpoints_the_step_marks_the_run_killed_and_the_relaunch_resumes(
        ray_head, small_fashion_mnist, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    name = f"stop-{uuid.uuid4().hex[:6]}"
    job = tiny_job(small_fashion_mnist, tmp_path, name)
    grace_env = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    first = ray_job(ray_head, "submit", "--no-wait", f"--submission-id={name}-1", f"--runtime-env-json={grace_env}",
                    "--", *job, timeout=120)
    assert first.returncode == 0, first.stderr
    log = ray_head.logs / f"job-driver-{name}-1.log"
    deadline = time.monotonic() + 180
    while not logged_steps(log) or logged_steps(log)[-1] < 3:
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no driver log"
        time.sleep(0.2)
    stop = ray_job(ray_head, "stop", f"{name}-1", timeout=120)  # waits until the job is stopped
    said = stop.stdout + stop.stderr
    assert stop.returncode == 0 and f"Job '{name}-1' was stopped" in said, said
    text = log.read_text()
    steps = logged_steps(log)
    step = steps[-1]
    assert 3 <= step < 16, text
    assert "WARNING run.stop_timeout" not in text  # the runtime_env's RAY_JOB_STOP_WAIT_TIME_S reached the driver
    assert (f"[rayssl] stopped by SIGTERM at step {step}: checkpoint of step {step} in {tmp_path / 'runs' / name}; "
            f"relaunch with run.name={name} to resume") in text, text

    fs, run_path = pyarrow.fs.LocalFileSystem(), str(tmp_path / "runs" / name)
    folder, state = checkpoints.latest_intact(fs, run_path)
    assert state["step"] == step, folder
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(state["tracking"]["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["rayssl.stopped_step"] == str(step)
    assert run.data.tags["rayssl.stopped"].startswith(f"stopped by SIGTERM at step {step}: checkpoint of step {step}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, step + 1))

    fast = json.dumps({"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})  # 0.5 s: time to stop the first mid-run
    again = ray_job(ray_head, "submit", f"--submission-id={name}-2", f"--runtime-env-json={fast}", "--", *job)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert f"[rayssl] resumed from step {step}/16" in again.stdout, again.stdout[-3000:]
    assert "WARNING run.stop_timeout: `ray job stop` kills this job 3 s after" in again.stdout  # Ray's default
    assert checkpoints.latest_intact(fs, run_path)[1]["step"] == 16
    run = client.get_run(run.info.run_id)  # the same MLflow run, one point per step
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 17))
