"""MLflow at the edge: where a run is recorded and what it records.

- The driver (``start`` / ``finish``) checks the tracking store before anything trains,
  creates the MLflow run (or finds the one stored in the run's latest checkpoint, so a
  relaunch keeps logging into it) and logs params, tags and the resolved config; at the end
  ``jobs/pretrain.py`` adds ``report.md`` (``log_report``).
- World rank 0 (``RunLogger``) logs metrics at every reported step, the per-epoch cluster
  plots, the training curves, ``results.json`` and the final backbone. An outage of the
  tracking server loses none of it: what MLflow does not take waits in an ordered, bounded
  backlog and is delivered when it answers again, or, if it still does not when training
  ends, kept in the run folder for ``jobs/sync_tracking.py`` (``rayssl.tracking_backlog``).
Nothing else in rayssl imports MLflow but ``rayssl.tracking_backlog``. Every value passes
through ``Config.redacted``, so secrets never reach params, tags, artifacts or the backlog.
Logging failures after the start only warn: tracking never stops training.

A server with authentication (MLflow's basic-auth app, or a proxy) gets the client's
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which MLflow reads from the
environment. ``check_access`` stops a job whose credentials the server refuses before Ray
starts, in one line that names the URI and the user, never the password; ``start`` hands the
driver's credentials to rank 0 inside its ``MlflowRun`` (a worker on a cluster started without
them does not inherit them), never through a runtime env, which Ray shows on its dashboard.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import rayssl
from rayssl.config import Config, ConfigError, mask_uri
from rayssl.data import storage
from rayssl.mlflow_client import mlflow_client, quick_http, sqlite_path
from rayssl.tracking_backlog import Backlog, RunFolder, Target, deliver, keep_text, one_line, undeliverable, weight

DEFAULT_STORE = "~/rayssl_results"
RUN_FILE = "tracking.json"  # beside checkpoint.pt in every checkpoint: {"run_id": ...}
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")  # read by MLflow's client
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
    # the driver's CREDENTIALS, for rank 0's process: never in a repr, a log or MLflow
    credentials: dict[str, str] = field(default_factory=dict, repr=False, compare=False)


def credentials() -> dict[str, str]:
    """This process's ``CREDENTIALS`` that are set."""
    return {name: os.environ[name] for name in CREDENTIALS if os.environ.get(name)}


def use_credentials(mlflow_run: MlflowRun) -> None:
    """Rank 0's process takes the driver's credentials (those the driver's check passed)."""
    os.environ.update(mlflow_run.credentials)


def refused(err: Exception, uri: str) -> str | None:
    """The one line for an MLflow error that refuses this client (HTTP 401 or 403), naming the
    URI (password masked) and the user, never the password; None for any other error."""
    status = getattr(err, "get_http_status_code", lambda: None)()
    if status not in (401, 403):
        return None
    where, user = f"tracking.uri: MLflow at {mask_uri(uri)}", os.environ.get("MLFLOW_TRACKING_USERNAME")
    if not user:
        return f"{where} asks for credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    if status == 401:
        return f"{where} refused the credentials (MLFLOW_TRACKING_USERNAME={user}): check MLFLOW_TRACKING_PASSWORD"
    return f"{where} denied MLFLOW_TRACKING_USERNAME={user} access: ask its admin for a permission on the experiment"


def check_access(cfg: Config) -> None:
    """Before Ray starts: a tracking server that refuses this client's credentials stops the job
    with ``refused``'s line as a ``ConfigError``, even with ``tracking.required=false`` (wrong
    credentials are to fix, not an outage to ride out). Any other failure is ``start``'s to judge."""
    uri = tracking_uri(cfg)
    if not cfg.tracking.enabled or not uri.startswith(("http://", "https://")):
        return
    try:
        with quick_http():
            mlflow_client(uri).get_experiment_by_name(cfg.tracking.experiment)
    except Exception as err:  # MLflow raises many kinds: connection, auth, bad URI
        if line := refused(err, uri):
            raise ConfigError(line) from None


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
    return MlflowRun(uri, run.info.run_id, experiment_id, cfg.tracking.log_model, cfg.tracking.register_as,
                     credentials())


def _open(cfg: Config, uri: str, work: Callable, activity: str):
    """``(client, experiment_id, work(client, experiment_id))`` against the store at ``uri``,
    failing fast; when that fails: a one-line ``ConfigError`` naming ``tracking.uri``, or with
    ``tracking.required=false`` a warning and None (refused credentials: ``refused``'s line, always)."""
    try:
        with quick_http():
            client = mlflow_client(uri)
            experiment_id = _experiment_id(client, cfg.tracking.experiment, uri)
            return client, experiment_id, work(client, experiment_id)
    except Exception as err:  # MLflow raises many kinds: connection, auth, bad URI
        if line := refused(err, uri):
            raise ConfigError(line) from None
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
    """The parent run of a sweep (``previous_run_id``'s, when a restored sweep had one), with the
    driver's credentials for the trials (``rayssl.tune.run_trial``), which may run on nodes started
    without them."""
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
    return MlflowRun(uri, run_id, experiment_id, credentials=credentials())  # for the trials, as ``start``'s


def finish_parent(parent_run: MlflowRun | None, summary: dict, files: list[Path]) -> None:
    """The sweep's outcome on its parent run: best value and params, the trials table, best.yaml.
    Child runs of trials that Tune stopped (ASHA, collapse, time budget) are marked KILLED."""
    if not parent_run:
        return
    logger = RunLogger(parent_run)
    try:
        with quick_http():
            for run in logger.client.search_runs([parent_run.experiment_id], f"tags.`mlflow.parentRunId` = "
                                                 f"'{parent_run.run_id}' AND attributes.status = 'RUNNING'"):
                logger.client.set_terminated(run.info.run_id, status="KILLED")
    except Exception as err:  # noqa: BLE001 - the sweep's outcome matters more
        log.warning("MLflow: stopped trials not marked KILLED (%s)", one_line(err))
    logger.numbers({"best_value": summary["best_value"], "num_trials": summary["num_trials"],
                    "stopped_early": summary["stopped_early"], "seconds": summary.get("seconds", 0)}, 0)
    for key, value in summary["best_params"].items():
        logger.tag(f"best.{key}", _param(value))
    logger.tag("sweep.metric", summary["metric"])
    for path in files:
        logger.artifact(path)
    logger.end()


def finish(mlflow_run: MlflowRun | None, failed: bool) -> None:
    """Driver side, after ``fit``: mark a failed run FAILED (rank 0 marks success FINISHED).
    A run rank 0 already finished stays FINISHED (Tune may stop a trial after its last report)."""
    if mlflow_run and failed:
        try:
            with quick_http():
                client = mlflow_client(mlflow_run.uri)
                if client.get_run(mlflow_run.run_id).info.status == "RUNNING":
                    client.set_terminated(mlflow_run.run_id, status="FAILED")
        except Exception as err:  # noqa: BLE001 - the training error matters more
            log.warning("MLflow: could not mark run %s failed: %s", mlflow_run.run_id, err)


def mark_stopped(mlflow_run: MlflowRun | None, tags: dict[str, str]) -> None:
    """Driver side, after a stop by signal (``rayssl.train.stop``): ``tags`` (``rayssl.stopped``:
    why and what was kept; ``rayssl.stopped_step``) and the status KILLED, unless rank 0 already
    ended the run. Bounded (``quick_http``): the job must exit before its SIGKILL."""
    if not mlflow_run:
        return
    try:
        with quick_http():
            from mlflow.entities import RunTag

            client = mlflow_client(mlflow_run.uri)
            client.log_batch(mlflow_run.run_id, tags=[RunTag(k, mask_uri(v)[:5000]) for k, v in tags.items()])
            if client.get_run(mlflow_run.run_id).info.status == "RUNNING":
                client.set_terminated(mlflow_run.run_id, status="KILLED")
    except Exception as err:  # noqa: BLE001 - the exit matters more
        log.warning("MLflow: could not mark run %s killed: %s", mlflow_run.run_id, one_line(err))


def log_report(uri: str, run_id: str, text: str, run_folder: RunFolder | None = None) -> bool:
    """Driver side, after ``fit``: ``text`` (``rayssl.report.render``, built from the redacted
    config) as the artifact ``report.md`` of run ``run_id``, by id: the run, which rank 0 has
    usually ended, is neither reopened nor made active. On failure one line to stderr and False;
    with ``run_folder``, ``report.md`` is kept in its backlog for ``jobs/sync_tracking.py``."""
    try:
        with quick_http():
            mlflow_client(uri, create=False).log_text(run_id, text, "report.md")
        return True
    except Exception as err:  # noqa: BLE001 - the run itself is done; the report was printed
        line = f"MLflow: report.md not logged to run {run_id} at {mask_uri(uri)} ({one_line(err)})"
        if run_folder:
            try:
                line += (f"; kept in {keep_text(run_folder, run_id, uri, 'report.md', text)}, deliver it with: "
                         f"python jobs/sync_tracking.py {run_folder.uri}")
            except Exception as kept:  # noqa: BLE001 - the printed report is still there
                line += f"; not kept either ({one_line(kept)})"
        print(line, file=sys.stderr)
        return False


def ui_hint(mlflow_run: MlflowRun) -> str:
    uri = mlflow_run.uri
    where = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else mask_uri(uri)
    return f"MLflow run {mlflow_run.run_id} (experiment {mlflow_run.experiment_id}): {where}"


class RunLogger:
    """World rank 0's MLflow writer. Every call is safe, and nothing it is given is lost to an
    outage of the tracking server (``rayssl.tracking_backlog``): each call becomes an entry of
    a bounded, ordered backlog, delivered at once while MLflow answers. When it does not, the
    entries wait (one console line), the head is retried at most every ``retry_seconds`` in
    the ``rayssl-mlflow`` thread beside training, and all of it goes in order once MLflow
    answers (one line). ``end`` delivers the final status last; if MLflow still does not
    answer, the backlog is written to ``run_folder`` for ``jobs/sync_tracking.py``.

    Metrics of a step already in the run (a restart recomputes up to one checkpoint interval)
    are not logged again, so every metric history has one point per step.
    ``model_config``: the config's ``model`` section, from which the logged backbone is rebuilt.
    """

    def __init__(self, mlflow_run: MlflowRun, say: Callable[[str], None] = print, retry_seconds: float = 5.0,
                 run_folder: RunFolder | None = None, model_config: dict | None = None,
                 backlog: Backlog | None = None):
        # a dead server must cost seconds per call, not MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        use_credentials(mlflow_run)
        self.mlflow_run, self.run_id, self.say = mlflow_run, mlflow_run.run_id, say
        self.run_folder, self.model_config = run_folder, model_config
        self.retry_seconds, self.retry_at = retry_seconds, 0.0
        self.down = self.warned_full = self.warned_dropped = False
        self.delivered = 0  # points delivered since MLflow stopped answering
        self.backlog = Backlog() if backlog is None else backlog
        self.sending = threading.Lock()  # one thread delivers at a time, in order
        self.client = mlflow_client(mlflow_run.uri)
        self.target = Target(self.client, mlflow_run.uri, mlflow_run.run_id)
        # the per-epoch plots are drawn beside training: drawn in the step, they held every rank
        # at each epoch boundary (rank 0 draws, the others wait at the next all-reduce).
        # On a busy CPU the thread's time still comes out of rank 0's step: the figures are cheap.
        # The same thread retries the backlog while MLflow does not answer.
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayssl-mlflow")
        # matplotlib's import (~0.5 CPU-s) during start-up, not in the first epoch's boundary window
        self.sender.submit(importlib.import_module, "rayssl.plots")
        try:
            history = self.client.get_metric_history(self.run_id, "loss")
        except Exception:  # noqa: BLE001 - said at the first entry that cannot be delivered
            history, self.retry_at = [], time.time() + retry_seconds
        self.last_step = max((m.step for m in history), default=0)

    # ------------------------------------------------------------------ delivery
    def _submit(self, entry: dict, here: bool = False) -> None:
        """Queue ``entry`` and deliver what MLflow takes: in this thread while it answers (or
        ``here``, in the sender thread), else in the sender thread, so training never waits."""
        if not self.backlog.add(entry):
            if not self.warned_full:
                self.warned_full = True
                self.say(f"[rayssl] MLflow backlog full ({self.backlog.max_points} points, "
                         f"{self.backlog.max_bytes / 2**20:.0f} MiB of files): newer metrics and artifacts "
                         "are dropped until MLflow answers")
            return
        if here or not self.down:
            self._pump()
        else:
            self.sender.submit(self._pump)

    def _pump(self) -> None:
        """Deliver from the head while MLflow answers; after a failure, nothing for
        ``retry_seconds``. A thread that finds another delivering leaves its entry to that one."""
        while len(self.backlog) and time.time() >= self.retry_at and self.sending.acquire(blocking=False):
            try:
                drained = self._drain()
            finally:
                self.sending.release()
            if not drained:
                return

    def _drain(self) -> bool:
        """Entries from the head until none is left (True) or MLflow does not answer (False)."""
        while (entry := self.backlog.head()) is not None:
            try:
                deliver(self.target, entry, self.backlog.spool)
                self.delivered += weight(entry)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                if not undeliverable(err):
                    self._failed(err)
                    return False
                self._dropped(entry, err)
            self.backlog.pop()
        if self.down:
            self.down = False
            self.say(f"[rayssl] MLflow back: {self.delivered} points delivered")
        return True

    def _failed(self, err: Exception) -> None:
        self.retry_at = time.time() + self.retry_seconds
        if not self.down:
            self.down, self.delivered = True, 0
            self.say(f"[rayssl] MLflow unreachable ({one_line(err)}); training continues, {self.backlog.points} "
                     "points kept, delivered when it answers")

    def _dropped(self, entry: dict, err: Exception) -> None:
        if not self.warned_dropped:
            self.warned_dropped = True
            self.say(f"[rayssl] MLflow: a {entry['kind']} entry cannot be delivered ({one_line(err)}); dropped, "
                     "as any further such entry will be")

    def _spool(self, name: str, write: Callable[[Path], Any], entry: dict, here: bool = False) -> None:
        """Write the file of ``entry`` (called ``name`` in MLflow) with ``write(path)``, then submit it."""
        try:
            entry["file"] = self.backlog.write(name, write)
        except Exception as err:  # noqa: BLE001 - a full local disk must not stop training either
            self.say(f"[rayssl] MLflow: {name} not logged ({one_line(err)})")
            return
        self._submit(entry, here)

    # ------------------------------------------------------------------ what a run logs
    def metrics(self, step: int, values: dict[str, float]) -> None:
        """The numbers of ``values`` at ``step``, unless the run already has that step."""
        if step > self.last_step:
            self.numbers(values, step)
            self.last_step = step

    def numbers(self, values: dict[str, Any], step: int) -> None:
        """Every finite number of ``values`` (but ``step``) as a metric at ``step``, stamped now."""
        batch = {k: float(v) for k, v in values.items()
                 if k != "step" and isinstance(v, (int, float)) and np.isfinite(v)}
        if batch:
            self._submit({"kind": "metrics", "step": step, "timestamp": int(time.time() * 1000), "values": batch})

    def param(self, key: str, value: Any) -> None:
        """One MLflow param found during the run (``train.total_steps`` of a budgeted run)."""
        self._submit({"kind": "param", "key": key, "value": _param(value)})

    def tag(self, key: str, value: str) -> None:
        self._submit({"kind": "tag", "key": key, "value": mask_uri(value)[:5000]})

    def artifact(self, path: str | Path, folder: str = "") -> None:
        """A copy of the file ``path`` as an artifact under ``folder``."""
        self._spool(Path(path).name, lambda to: shutil.copyfile(path, to), {"kind": "artifact", "path": folder})

    def epoch_plots(self, epoch: int, prior: np.ndarray, assigned: np.ndarray) -> None:
        """The cluster-prior histogram and the cluster-usage bars of one epoch, drawn and logged in
        a background thread (``end`` waits for them)."""
        self.sender.submit(self._epoch_plots, epoch, prior, assigned)

    def _epoch_plots(self, epoch: int, prior: np.ndarray, assigned: np.ndarray) -> None:
        from rayssl.plots import prior_figure, usage_figure

        name, usage = f"epoch_{epoch:03d}.png", f"epoch {epoch}: images per cluster (normalised teacher argmax)"
        self._spool(name, lambda to: prior_figure(prior, f"epoch {epoch}: teacher cluster prior").savefig(to),
                    {"kind": "artifact", "path": "plots/cluster_prior"}, here=True)
        self._spool(name, lambda to: usage_figure(assigned, usage).savefig(to),
                    {"kind": "artifact", "path": "plots/cluster_usage"}, here=True)

    def figures(self, figures: dict, folder: str) -> None:
        """Matplotlib figures as PNG artifacts under ``folder``, each named by its key."""
        for name, fig in figures.items():
            self._spool(name, fig.savefig, {"kind": "artifact", "path": folder})

    def curves(self, title: str) -> None:
        """``plots/training_curves.png`` from the run's whole metric history (all launches), drawn
        once every metric before it is delivered."""
        self._submit({"kind": "curves", "title": title})

    def results(self, results: dict, step: int) -> None:
        """``results.json`` and its numbers as metrics at the final step."""
        self._spool("results.json", lambda to: to.write_text(json.dumps(results, indent=2)),
                    {"kind": "artifact", "path": ""})
        self.numbers(results, step)

    def model(self, backbone, example: np.ndarray, metadata: dict) -> None:
        """The backbone via ``mlflow.pytorch.log_model``, optionally registered: its weights
        (tensors only) and ``example`` are spooled and the module rebuilt from ``model_config``."""
        import torch

        self._spool("backbone.pt", lambda to: torch.save(
            {"state_dict": backbone.state_dict(), "example": torch.from_numpy(example)}, to),
            {"kind": "model", "model": self.model_config, "metadata": metadata,
             "register_as": self.mlflow_run.register_as})

    def end(self, status: str | None = "FINISHED") -> None:
        """Deliver what is left and then ``status`` (None leaves the run's status as it is). If
        MLflow still does not answer, the backlog goes to ``run_folder`` (one line says where)."""
        self.sender.shutdown(wait=True)  # the epoch plots drawn, the retries done
        if status:
            self.backlog.add({"kind": "status", "status": status})
        self.retry_at = 0.0  # one more try, now
        self._pump()
        if len(self.backlog):
            self._keep()
        self.backlog.close()

    def _keep(self) -> None:
        kept = self.backlog.summary()
        if self.run_folder is None:
            self.say(f"[rayssl] MLflow unreachable: {kept} not delivered to run {self.run_id}")
            return
        try:
            where = self.backlog.keep(self.run_folder, {"run_id": self.run_id, "uri": mask_uri(self.mlflow_run.uri)})
        except Exception as err:  # noqa: BLE001 - the checkpoints are what matters now
            self.say(f"[rayssl] MLflow unreachable: {kept} lost, the backlog could not be written to "
                     f"{self.run_folder.uri} ({one_line(err)})")
            return
        self.say(f"[rayssl] MLflow still unreachable at the end: {kept} kept in {where}; deliver them with: "
                 f"python jobs/sync_tracking.py {self.run_folder.uri}")


def checkpoint_record(mlflow_run: MlflowRun | None) -> dict | None:
    """What a checkpoint keeps of tracking: the run id and the URI (password masked)."""
    return {"run_id": mlflow_run.run_id, "uri": mask_uri(mlflow_run.uri)} if mlflow_run else None


def log_evaluation(record: dict | None, step: int, results: dict, files: list[Path],
                   uri: str | None = None) -> str | None:
    """``jobs/evaluate.py``: add the evaluation's numbers (at the checkpoint's ``step``) and
    files (under ``evaluation/``) to the run a checkpoint came from (``record``, see
    ``checkpoint_record``; ``uri`` overrides its URI). The run id, or None when not logged."""
    if not record:
        return None
    mlflow_run = MlflowRun(uri or os.environ.get("MLFLOW_TRACKING_URI") or record["uri"], record["run_id"])
    try:
        with quick_http():
            mlflow_client(mlflow_run.uri).get_run(mlflow_run.run_id)
    except Exception as err:  # noqa: BLE001 - the evaluation itself is written already
        print(f"MLflow: run {mlflow_run.run_id} not reachable at {mask_uri(mlflow_run.uri)} "
              f"({type(err).__name__}); evaluation not logged", file=sys.stderr)
        return None
    logger = RunLogger(mlflow_run)
    logger.numbers(results, step)
    for path in files:
        logger.artifact(path, "evaluation")
    logger.end(status=None)
    return mlflow_run.run_id
