"""The one way rayssl opens an MLflow store: an explicit ``MlflowClient``, global state left alone."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` tracking URI; ``None`` for any other store."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def mlflow_client(uri: str, create: bool = True):
    """An ``MlflowClient`` of ``uri`` (mlflow is imported only here, on the first call).

    For a SQLite store, ``create=True`` makes the database's folder (MLflow creates the file);
    ``create=False`` raises ``FileNotFoundError`` naming the file when it does not exist, for
    readers that must not leave an empty store behind.
    """
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None and create:
        db.parent.mkdir(parents=True, exist_ok=True)
    elif db is not None and not db.exists():
        raise FileNotFoundError(str(db))
    return MlflowClient(tracking_uri=uri)


@contextmanager
def quick_http() -> Iterator[None]:
    """Fail fast on an unreachable server: MLflow otherwise retries for minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
