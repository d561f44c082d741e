"""``WorkerPayload``: what the driver (``rayssl.train.launch``) hands every Ray Train worker
(``rayssl.train.loop.train_loop_per_worker``), pickled by Ray with the training function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow.fs

from rayssl.data.meta import DataMeta
from rayssl.tracking import MlflowRun


@dataclass(frozen=True)
class WorkerPayload:
    """One launch's inputs to each worker. ``config`` is ``Config.model_dump()``: its secret
    fields stay ``SecretStr`` (masked in any repr); ``filesystem`` holds the S3 keys, as Ray
    Train's own storage filesystem does."""

    config: dict[str, Any]  # validated again on the worker (Config.model_validate)
    meta: DataMeta
    mlflow_run: MlflowRun | None  # the MLflow run rank 0 logs into (rayssl.tracking.start); None: no tracking
    steps_per_epoch: int
    run_path: str  # the run folder as Ray Train stores it: absolute, or the bucket path
    run_uri: str  # the run folder as the user wrote it (s3://..., credentials masked), for the console
    filesystem: pyarrow.fs.FileSystem | None  # run.storage_path's filesystem (None: local)
    job_started: float  # time.time() on the driver at the job's start (train.time_budget_scope=job)
    console: Any = None  # the driver's console queue (rayssl.console); None: rank 0 prints
    stop_key: str | None = None  # where the driver posts its stop request (rayssl.train.stop)
