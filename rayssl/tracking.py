"""MLflow at the edge: where a run is recorded and what it records.

- The driver (``start`` / ``finish``) checks the tracking store before anything trains,
  creates the MLflow run (or finds the one stored in the run's latest checkpoint, so a
  relaunch keeps logging into it) and logs params, tags and the resolved config; at the end
  ``jobs/pretrain.py`` adds ``report.md`` (``log_report``).
- World rank 0 (``RunLogger``) logs metrics at every reported step, the per-epoch cluster
  plots, the training curves, ``results.json`` and the final backbone.
Nothing else in rayssl imports MLflow. Every value passes through ``Config.redacted``, so
secrets never reach params, tags or artifacts. Logging failures after the start only warn:
tracking never stops training.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import rayssl
from rayssl.config import Config, ConfigError, mask_uri
from rayssl.data import storage
from rayssl.mlflow_client import mlflow_client, sqlite_path

DEFAULT_STORE = "~/rayssl_results"
RUN_FILE = "tracking.json"  # beside checkpoint.pt in every checkpoint: {"run_id": ...}
MODEL_NAME = "backbone"
_PARAM_BATCH = 100  # MLflow's limit of params per log_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MlflowRun:
    """The MLflow run a launch logs into (what ``start`` returns and ``RunLogger`` writes to)."""

    uri: str
    run_id: str
    experiment_id: str | None = None  # None when only a checkpoint's record names the run
    log_model: bool = False  # tracking.log_model: log the teacher's backbone at the end
    register_as: str | None = None  # tracking.register_as: the registered model's name


def default_uri(storage_path: str = DEFAULT_STORE) -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store beside the run outputs (``run.storage_path``,
    or ``~/rayssl_results`` when that is ``s3://``): ``mlflow ui --backend-store-uri`` it."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = DEFAULT_STORE if storage.is_s3(storage_path) else storage_path
    return f"sqlite:///{Path(folder).expanduser().resolve() / 'mlflow.db'}"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.uri or default_uri(cfg.run.storage_path)


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go in ``mlartifacts/`` beside the database (absolute, since
    Ray and Tune change the working directory); a server chooses its own."""
    db = sqlite_path(uri)
    return str(db.parent / "mlartifacts") if db is not None else None


@contextmanager
def _quick_http() -> Iterator[None]:
    """Fail fast on an unreachable server: MLflow otherwise retries for minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


def git_commit() -> str | None:
    """The commit of the rayssl checkout, if it is one (``ray job submit`` uploads no ``.git``)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(rayssl.__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_tags(cfg: Config, run_path: str) -> dict[str, str]:
    import ray
    import torch

    tags = {"rayssl.version": rayssl.__version__, "rayssl.git_commit": git_commit() or "unknown",
            "rayssl.run_path": mask_uri(run_path), "ray.version": ray.__version__,
            "torch.version": torch.__version__, "scaling.num_workers": _param(cfg.flat()["scaling.num_workers"]),
            "device": "cuda" if cfg.scaling.use_gpu else "cpu", "objective.mode": cfg.objective.mode}
    return tags


def _param(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def stored_run_id(filesystem, run_path: str) -> str | None:
    """The MLflow run id saved beside the newest checkpoint of ``run_path`` (a Ray Train run folder)."""
    import pyarrow.fs

    from rayssl.checkpoint import candidates

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    for folder in candidates(fs, run_path):
        try:
            with fs.open_input_stream(f"{folder}/{RUN_FILE}") as f:
                return json.loads(f.read())["run_id"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def start(cfg: Config, run_path: str, filesystem=None, parent_run_id: str | None = None) -> MlflowRun | None:
    """Driver side, before training: the MLflow run this launch logs into (``None`` when tracking is off or, with ``tracking.required=false``,
    unreachable). Raises ``ConfigError`` naming ``tracking.uri`` when the store is unreachable.

    A relaunch of a run with a checkpoint continues the MLflow run stored in that checkpoint;
    params that changed since are recorded as ``resumed.<key>`` tags and a new config artifact.
    A sweep's trial names its sweep's run as ``parent_run_id`` (MLflow's nested runs).
    """
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg)

    def stored_run(client, experiment_id):
        run_id = stored_run_id(filesystem, run_path)
        return client.get_run(run_id) if run_id else None

    opened = _open(cfg, uri, stored_run, "training")
    if opened is None:
        return None
    client, experiment_id, run = opened
    params = {k: _param(v) for k, v in cfg.flat().items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if run is None:
        name = cfg.tracking.run_name or Path(run_path).name
        tags = {**run_tags(cfg, run_path), **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        new = params
        client.log_dict(run.info.run_id, cfg.redacted(), "config.yaml")
    else:
        old = run.data.params
        new = {k: v for k, v in params.items() if k not in old}
        changed = {k: v for k, v in params.items() if k in old and old[k] != v}
        if changed:
            client.log_dict(run.info.run_id, cfg.redacted(), f"config-resumed-{stamp}.yaml")
        from mlflow.entities import RunTag

        client.log_batch(run.info.run_id, tags=[RunTag(f"resumed.{k}", v) for k, v in changed.items()])
        client.update_run(run.info.run_id, status="RUNNING")
    _log_params(client, run.info.run_id, new)
    return MlflowRun(uri, run.info.run_id, experiment_id, cfg.tracking.log_model, cfg.tracking.register_as)


def _open(cfg: Config, uri: str, work: Callable, activity: str):
    """``(client, experiment_id, work(client, experiment_id))`` against the store at ``uri``,
    failing fast; when that fails: a one-line ``ConfigError`` naming ``tracking.uri``, or with
    ``tracking.required=false`` a warning and None."""
    try:
        with _quick_http():
            client = mlflow_client(uri)
            experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)
            return client, experiment_id, work(client, experiment_id)
    except Exception as err:  # MLflow raises many kinds: connection, auth, bad URI
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        message = f"tracking.uri: cannot use MLflow at {mask_uri(uri)}: {mask_uri(detail)}"
        if cfg.tracking.required:
            raise ConfigError(f"{message} (set tracking.required=false for {activity} without it)") from None
        log.warning("%s; %s continues without tracking (tracking.required=false)", message, activity)
        return None


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), _PARAM_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAM_BATCH])


def start_parent(cfg: Config, name: str, params: dict[str, Any], previous_run_id: str | None) -> MlflowRun | None:
    """The parent run of a sweep (``previous_run_id``'s, when a restored sweep had one)."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg)

    def parent_run(client, experiment_id) -> str:
        if previous_run_id:
            client.update_run(previous_run_id, status="RUNNING")
            return previous_run_id
        run = client.create_run(experiment_id, run_name=name, tags={
            "rayssl.version": rayssl.__version__, "rayssl.sweep": name})
        _log_params(client, run.info.run_id, {k: mask_uri(_param(v)) for k, v in params.items()})
        return run.info.run_id

    opened = _open(cfg, uri, parent_run, "the sweep")
    if opened is None:
        return None
    _, experiment_id, run_id = opened
    return MlflowRun(uri, run_id, experiment_id)


def finish_parent(parent: MlflowRun | None, summary: dict, files: list[Path]) -> None:
    """The sweep's outcome on its parent run: best value and params, the trials table, best.yaml.
    Child runs of trials that Tune stopped (ASHA, collapse, time budget) are marked KILLED."""
    if not parent:
        return
    logger = RunLogger(parent)
    stopped = logger._safe(logger.client.search_runs, [parent.experiment_id],
                           f"tags.`mlflow.parentRunId` = '{parent.run_id}' AND attributes.status = 'RUNNING'")
    for run in stopped or []:
        logger._safe(logger.client.set_terminated, run.info.run_id, status="KILLED")
    logger.numbers({"best_value": summary["best_value"], "num_trials": summary["num_trials"],
                    "stopped_early": summary["stopped_early"], "seconds": summary.get("seconds", 0)}, 0)
    from mlflow.entities import RunTag

    logger._safe(logger.client.log_batch, parent.run_id, tags=[
        RunTag(f"best.{k}", _param(v)) for k, v in summary["best_params"].items()] + [
        RunTag("sweep.metric", summary["metric"])])
    for path in files:
        logger._safe(logger.client.log_artifact, parent.run_id, str(path))
    logger.end()


def finish(settings: MlflowRun | None, failed: bool) -> None:
    """Driver side, after ``fit``: mark a failed run FAILED (rank 0 marks success FINISHED).
    A run rank 0 already finished stays FINISHED (Tune may stop a trial after its last report)."""
    if settings and failed:
        try:
            with _quick_http():
                client = mlflow_client(settings.uri)
                if client.get_run(settings.run_id).info.status == "RUNNING":
                    client.set_terminated(settings.run_id, status="FAILED")
        except Exception as err:  # noqa: BLE001 - the training error matters more
            log.warning("MLflow: could not mark run %s failed: %s", settings.run_id, err)


def log_report(uri: str, run_id: str, text: str) -> bool:
    """Driver side, after ``fit``: ``text`` (``rayssl.report.render``, built from the redacted
    config) as the artifact ``report.md`` of run ``run_id``, by id: the run, which rank 0 has
    usually ended, is neither reopened nor made active. On failure one line to stderr and False."""
    try:
        with _quick_http():
            mlflow_client(uri, create=False).log_text(run_id, text, "report.md")
        return True
    except Exception as err:  # noqa: BLE001 - the run itself is done; the report was printed
        print(f"MLflow: report.md not logged to run {run_id} at {mask_uri(uri)} "
              f"({type(err).__name__}: {mask_uri(str(err).splitlines()[0][:160]) if str(err) else ''})",
              file=sys.stderr)
        return False


def ui_hint(settings: dict) -> str:
    uri = settings.uri
    where = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else mask_uri(uri)
    return f"MLflow run {settings.run_id} (experiment {settings.experiment_id}): {where}"


class RunLogger:
    """World rank 0's MLflow writer. Every call is safe: a failure warns once, then logging
    pauses for ``retry_seconds`` and resumes; training goes on regardless.

    Metrics of a step already in the run (a restart recomputes up to one checkpoint interval)
    are not logged again, so every metric history has one point per step.
    """

    def __init__(self, settings: MlflowRun, say: Callable[[str], None] = print, retry_seconds: float = 60.0):
        # a dead server must cost seconds per call, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self.settings, self.run_id, self.say = settings, settings.run_id, say
        self.retry_seconds, self.paused_until, self.warned = retry_seconds, 0.0, False
        self.client = mlflow_client(settings.uri)
        # the per-epoch plots are drawn beside training: drawn in the step, they held every rank
        # for 0.4-0.5 s at each epoch boundary (rank 0 draws, the others wait at the next all-reduce).
        # On a busy CPU the thread's time still comes out of rank 0's step: the figures are cheap.
        self.plotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayssl-plots")
        # matplotlib's import (~0.5 CPU-s) during start-up, not in the first epoch's boundary window
        self.plotter.submit(importlib.import_module, "rayssl.plots")
        history = self._safe(self.client.get_metric_history, self.run_id, "loss") or []
        self.last_step = max((m.step for m in history), default=0)

    def _safe(self, fn: Callable, *args, **kwargs):
        if time.time() < self.paused_until:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self.paused_until = time.time() + self.retry_seconds
            if not self.warned:
                self.say(f"[rayssl] MLflow logging failed ({type(err).__name__}: "
                         f"{mask_uri(str(err).splitlines()[0][:160]) if str(err) else ''}); "
                         f"training continues, logging retries in {self.retry_seconds:.0f} s")
                self.warned = True
            return None

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """The numbers of ``values`` at ``step``, unless the run already has that step."""
        if step > self.last_step:
            self.numbers(values, step)
            self.last_step = step

    def numbers(self, values: dict[str, Any], step: int) -> None:
        """Every finite number of ``values`` (but ``step``) as a metric at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if k != "step" and isinstance(v, (int, float)) and np.isfinite(v)]
        self._safe(self.client.log_batch, self.run_id, metrics=batch)

    def param(self, key: str, value: Any) -> None:
        """One MLflow param found during the run (``train.total_steps`` of a budgeted run)."""
        self._safe(self.client.log_param, self.run_id, key, _param(value))

    def tag(self, key: str, value: str) -> None:
        self._safe(self.client.set_tag, self.run_id, key, mask_uri(value)[:5000])

    def epoch_plots(self, epoch: int, prior: np.ndarray, assigned: np.ndarray) -> None:
        """The cluster-prior histogram and the cluster-usage bars of one epoch, drawn and logged in
        a background thread (``end`` waits for them)."""
        self.plotter.submit(self._epoch_plots, epoch, prior, assigned)

    def _epoch_plots(self, epoch: int, prior: np.ndarray, assigned: np.ndarray) -> None:
        from rayssl.plots import prior_figure, usage_figure

        self._safe(self.client.log_figure, self.run_id,
                   prior_figure(prior, f"epoch {epoch}: teacher cluster prior"),
                   f"plots/cluster_prior/epoch_{epoch:03d}.png")
        self._safe(self.client.log_figure, self.run_id,
                   usage_figure(assigned, f"epoch {epoch}: images per cluster (normalised teacher argmax)"),
                   f"plots/cluster_usage/epoch_{epoch:03d}.png")

    def curves(self, title: str) -> None:
        """``plots/training_curves.png`` from the run's whole metric history (all launches)."""
        from rayssl.plots import CURVES, curves_figure

        def history() -> dict:
            return {name: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, name)]
                    for _, names in CURVES for name in names}

        points = self._safe(history)
        if points:
            self._safe(self.client.log_figure, self.run_id, curves_figure(points, title),
                       "plots/training_curves.png")

    def results(self, results: dict, step: int) -> None:
        """``results.json`` and its numbers as metrics at the final step."""
        self._safe(self.client.log_dict, self.run_id, results, "results.json")
        self.numbers(results, step)

    def model(self, backbone, example: np.ndarray, metadata: dict) -> None:
        """The backbone via ``mlflow.pytorch.log_model`` (rayssl's code bundled, so
        ``mlflow.pytorch.load_model`` needs no rayssl install), optionally registered."""
        def log() -> None:
            import mlflow
            import mlflow.pytorch
            import torch
            import torchvision

            mlflow.set_tracking_uri(self.settings.uri)
            with mlflow.start_run(run_id=self.run_id):
                info = mlflow.pytorch.log_model(
                    backbone, name=MODEL_NAME, input_example=example, metadata=metadata,
                    code_paths=[str(Path(rayssl.__file__).parent)],
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                      f"torchvision=={torchvision.__version__.split('+')[0]}"],
                    registered_model_name=self.settings.register_as)
                mlflow.set_tag("rayssl.model_uri", info.model_uri)

        self._safe(log)

    def end(self) -> None:
        self.plotter.shutdown(wait=True)
        self.paused_until = 0.0  # the final status matters most: try it even while paused
        self._safe(self.client.set_terminated, self.run_id, status="FINISHED")


def checkpoint_record(settings: MlflowRun | None) -> dict | None:
    """What a checkpoint keeps of tracking: the run id and the URI (password masked)."""
    return {"run_id": settings.run_id, "uri": mask_uri(settings.uri)} if settings else None


def log_evaluation(record: dict | None, step: int, results: dict, files: list[Path],
                   uri: str | None = None) -> str | None:
    """``jobs/evaluate.py``: add the evaluation's numbers (at the checkpoint's ``step``) and
    files (under ``evaluation/``) to the run a checkpoint came from (``record``, see
    ``checkpoint_record``; ``uri`` overrides its URI). The run id, or None when not logged."""
    if not record:
        return None
    settings = MlflowRun(uri or os.environ.get("MLFLOW_TRACKING_URI") or record["uri"], record["run_id"])
    try:
        with _quick_http():
            mlflow_client(settings.uri).get_run(settings.run_id)
    except Exception as err:  # noqa: BLE001 - the evaluation itself is written already
        print(f"MLflow: run {settings.run_id} not reachable at {mask_uri(settings.uri)} "
              f"({type(err).__name__}); evaluation not logged", file=sys.stderr)
        return None
    logger = RunLogger(settings)
    logger.numbers(results, step)
    for path in files:
        logger._safe(logger.client.log_artifact, settings.run_id, str(path), "evaluation")
    return settings.run_id
