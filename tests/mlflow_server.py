"""A real ``mlflow server`` on 127.0.0.1 for the tests (SQLite backend, proxied artifacts), in
its own process group so that stopping it stops its workers; a test may stop it and start it
again on the same port and store. With ``admin=(user, password)`` it runs MLflow's basic-auth
app (``--app-name basic-auth``, its user store beside the tracking one) with that admin user.
Loopback only, bounded waits."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, proxied artifacts) that a test stops and starts
    again on the same port and store; its own process group, so stopping it stops its workers."""

    def __init__(self, root: Path, admin: tuple[str, str] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.port, self.proc, self.admin = root, free_port(), None, admin
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        args, env = [], {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.admin:
            args = ["--app-name", "basic-auth"]  # its CSRF key: any, but the same across restarts
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(self._auth_config()), MLFLOW_FLASK_SERVER_SECRET_KEY=self.root.name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", *args],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "a"))
        deadline = time.time() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start in {timeout:.0f} s; see {self.root}/server.log")
            time.sleep(0.25)

    def _auth_config(self) -> Path:
        """The basic-auth app's config: its user store in ``root``, the admin user, no access without one."""
        path = self.root / "basic_auth.ini"
        user, password = self.admin
        path.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                        f"database_uri = sqlite:///{self.root}/basic_auth.db\n"
                        f"admin_username = {user}\nadmin_password = {password}\n"
                        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        return path

    def add_user(self, name: str, password: str) -> None:
        """A user of the basic-auth app, created by the admin; it has no permission but the default."""
        token = base64.b64encode(":".join(self.admin).encode()).decode()
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/users/create", json.dumps({"username": name, "password": password}).encode(),
            {"Content-Type": "application/json", "Authorization": f"Basic {token}"})
        assert urllib.request.urlopen(request, timeout=10).status == 200

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        deadline = time.time() + 15
        while answers(self.port) and time.time() < deadline:  # its workers may outlive it briefly
            time.sleep(0.1)
        assert not answers(self.port), "the stopped mlflow server still answers"
