"""Driver side, the one launch path of ``jobs/pretrain.py`` and of every Tune trial.

    launch = check_inputs(cfg)   # config, storage, data, batch size: all before Ray starts
    fit(launch)                  # MLflow run, Ray, datasets, TorchTrainer.fit, FAILED on error
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs
import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from rayssl.config import Config, ConfigError, mask_uri
from rayssl.data import storage as data_storage
from rayssl.data.datasets import DataPlan, build_datasets, plan_data
from rayssl import console, tracking
from rayssl.train.batching import steps_per_epoch
from rayssl.train.loop import train_loop_per_worker
from rayssl.train.payload import WorkerPayload
from rayssl import checkpoint as checkpoints
from rayssl.train.saves import DISK_FULL, FAILED_STOPS, SIGNALLED
from rayssl.train.step import NonFiniteError
from rayssl.train.watchdog import find_stall
from rayssl.train.stop import JobStopped, StopSignals, Unfinished, exit_code


def init_ray(address: str | None, min_cpus: float = 0, verbose: bool = True) -> None:
    """Join ``scaling.address`` / ``RAY_ADDRESS`` (e.g. inside ``ray job submit``) or the local
    cluster of ``ray start`` (``local_cluster``), or start a local Ray with at least ``min_cpus``
    logical CPUs (oversubscribing a small machine); a cluster that crashed and left its address
    file behind is named in one line and a fresh one started.

    Not ``verbose`` (``run.verbose=false``): the processes' output and Ray's driver-side logs
    stay in Ray's log folder (``rayssl-driver.log`` beside the workers' logs); rank 0's lines
    reach the console through ``rayssl.console``.
    """
    if not verbose:  # also for a process that already joined Ray (a test session, a notebook)
        console.quiet_ray_logs()
    if ray.is_initialized():
        return
    live, stale = local_cluster()
    if address or os.environ.get("RAY_ADDRESS") or live:  # a cluster named, or the one `ray start` left
        ray.init(address=address or live, log_to_driver=verbose)
    else:
        if stale:
            print(f"[rayssl] the local Ray cluster named in {ray_address_file()} ({stale}) is gone: starting a "
                  "fresh one (`ray stop` or removing that file silences this)", flush=True)
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=verbose,
                 num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)))
    if not verbose:
        console.driver_log(ray_logs_dir())


def ray_address_file() -> str:
    """Where ``ray start`` names the cluster that a plain ``ray.init()`` joins (Ray's temp folder,
    ``RAY_TMPDIR``)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def local_cluster() -> tuple[str | None, str | None]:
    """``(live, stale)``: the address in ``ray_address_file()`` when its GCS accepts a connection
    (``ray start --head`` on this machine: joined, as ``ray.init()`` would), else it as ``stale``
    (the cluster crashed or was killed and left the file: a plain ``ray.init()`` would fail on it)."""
    path = ray_address_file()
    found = Path(path).read_text().strip() if os.path.exists(path) else ""
    if not found:
        return None, None
    host, _, port = found.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return found, None
    except (OSError, ValueError):
        return None, found


def ray_logs_dir() -> str | None:
    """Ray's log folder of this session on the driver's node (None if Ray does not say)."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return node.get_logs_dir_path() if node is not None else None


def storage(cfg: Config) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig, checked writable.

    Local paths become absolute (Ray requires it); ``s3://`` gets the explicit pyarrow S3
    filesystem of ``rayssl.data.storage`` with the runs' credentials (``S3Options.for_runs``:
    ``data.access_key_id``/``data.secret_access_key`` or the AWS chain, never the data's read-only
    ``RAYSSL_DATA_*`` pair; ``data.endpoint_url``, region, retries).
    """
    path = cfg.run.storage_path
    s3 = data_storage.S3Options.for_runs(cfg.data)
    try:
        data_storage.check_writable(path, s3)
    except data_storage.StorageError as err:
        raise data_storage.StorageError(f"run.storage_path: {err}") from None
    if data_storage.is_s3(path):
        fs, bucket_path = data_storage.resolve(path, s3)
        return bucket_path, data_storage.riding_out(fs, s3)  # Ray Train's own writes wait out an outage too
    return str(Path(path).expanduser().resolve()), None


def build_trainer(launch: Launch, mlflow_run: tracking.MlflowRun | None, callbacks: list | None = None,
                  console_queue=None, stop_key: str | None = None) -> TorchTrainer:
    """The TorchTrainer of a checked launch, with the MLflow run from ``rayssl.tracking.start``
    (or None), Train ``callbacks`` (a sweep's report to Tune), the driver's console queue
    (``rayssl.console``; None: rank 0 prints) and its stop request's key (``rayssl.train.stop``)."""
    cfg, path, filesystem = launch.cfg, launch.path, launch.filesystem
    s = cfg.scaling
    datasets, run_path = build_datasets(cfg, launch.data), f"{path}/{run_name(cfg)}"
    ordered = ("knn_bank", "eval", "online_bank", "online_eval", "gallery") + (("train",) if cfg.data.deterministic else ())
    payload = WorkerPayload(config=cfg.model_dump(), meta=launch.data.meta, mlflow_run=mlflow_run,
                            steps_per_epoch=launch.steps_per_epoch, run_path=run_path,
                            run_uri=run_uri(cfg, run_path), filesystem=filesystem, job_started=launch.started,
                            console=console_queue, stop_key=stop_key)
    return TorchTrainer(
        functools.partial(train_loop_per_worker, payload),  # pickled by Ray, with the payload
        scaling_config=ray.train.ScalingConfig(
            num_workers=(s.min_workers, s.max_workers) if s.elastic else s.max_workers, use_gpu=s.use_gpu,
            resources_per_worker=s.resources_per_worker, placement_strategy=s.placement_strategy,
            elastic_resize_monitor_interval_s=s.resize_check_s),
        run_config=ray.train.RunConfig(
            name=run_name(cfg), storage_path=path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"), callbacks=callbacks),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            execution_options={name: _ingest_options(name in ordered) for name in datasets}),
    )


def _ingest_options(preserve_order: bool) -> ray.data.ExecutionOptions:
    """Ray Data's options for one dataset, given for every dataset: Ray Train's defaults
    (``default_ingest_options``) pass the deprecated ``exclude_resources`` and warn.
    ``preserve_order``: limited k-NN sets are then the same first N rows on every evaluation (and
    in ``jobs/evaluate.py``), not whichever blocks came first; with ``data.deterministic`` the
    training stream too."""
    current = ray.data.DataContext.get_current().execution_options
    return ray.data.ExecutionOptions(resource_limits=current.resource_limits, preserve_order=preserve_order,
                                     verbose_progress=current.verbose_progress)


def run_uri(cfg: Config, ray_run_path: str) -> str:
    """The run folder as a user writes it (what ``jobs/evaluate.py --checkpoint`` takes):
    ``s3://bucket/prefix/<run>`` (credentials masked) for an s3:// ``run.storage_path``, whose
    Ray path has no scheme; else Ray's absolute local ``ray_run_path``."""
    storage = cfg.run.storage_path.rstrip("/")
    return f"{mask_uri(storage)}/{run_name(cfg)}" if "://" in storage else ray_run_path


def run_name(cfg: Config) -> str:
    """``run.name`` or a new ``rayssl-<mode>-<time>``, fixed on first use."""
    if cfg.run.name is None:
        cfg.run.name = f"rayssl-{cfg.objective.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.run.name


@dataclass
class Launch:
    """A run's inputs, checked: the config, where Ray Train stores it, its data."""

    cfg: Config
    path: str  # run.storage_path as Ray Train takes it (absolute, or the bucket path)
    filesystem: pyarrow.fs.FileSystem | None
    data: DataPlan
    steps_per_epoch: int
    started: float  # the job's start, time.time(): train.time_budget_scope=job counts from it


def check_inputs(cfg: Config, min_cpus: float = 0, started: float | None = None) -> Launch:
    """Every input check, before Ray starts: storage writable, the tracking server takes the
    credentials, data found, the batch fits the data. Each failure is one line naming the field.
    Only a first Fashion-MNIST run starts Ray here (``init_ray(scaling.address, min_cpus)``),
    after its checks, to build the shards. ``started``: when the job started (default: now)."""
    started = time.time() if started is None else started
    path, filesystem = storage(cfg)
    tracking.check_access(cfg)
    data = plan_data(cfg, start_ray=lambda: init_ray(cfg.scaling.address, min_cpus, cfg.run.verbose))
    return Launch(cfg, path, filesystem, data, steps_per_epoch(cfg, data.meta.num_train), started)


def check_shared_storage(cfg: Config, nodes: int) -> None:
    """On a cluster of more than one node, nodes share no disk: refuse a local
    ``run.storage_path`` and a SQLite or file MLflow store (one line saying what to set)."""
    if nodes < 2:
        return
    if not data_storage.is_s3(cfg.run.storage_path):
        raise ConfigError(f"run.storage_path: {cfg.run.storage_path} is a local folder, but this Ray cluster has "
                          f"{nodes} nodes that share no disk; set it to s3://bucket/prefix")
    uri = tracking.tracking_uri(cfg)
    if cfg.tracking.enabled and (uri.split(":", 1)[0] in ("sqlite", "file") or ":" not in uri):
        raise ConfigError(f"tracking.uri: {mask_uri(uri)} is a local MLflow store, but this Ray cluster has "
                          f"{nodes} nodes that share no disk; set it to an mlflow server (http://host:5000)")


def placement_warning(cfg: Config, cluster: dict[str, float]) -> str | None:
    """A one-line warning when the cluster's total resources cannot hold ``min`` training
    workers (Ray Train would wait for them; an autoscaler may still add the nodes), else None."""
    s = cfg.scaling
    need = s.resources_per_worker
    fits = min((int(cluster.get(k, 0) // v) for k, v in need.items() if v > 0), default=s.min_workers)
    if fits >= s.min_workers:
        return None
    per_worker = ", ".join(f"{v:g} {k}" for k, v in need.items())
    return (f"[rayssl] WARNING scaling.num_workers: the cluster holds {fits} of the {s.min_workers} workers "
            f"needed ({per_worker} each) and training waits until nodes join; lower scaling.num_workers "
            f"(or its min) or the per-worker resources")


def fit(launch: Launch, parent_run_id: str | None = None, callbacks: list | None = None,
        show: bool = False) -> dict:
    """Train a checked launch; rank 0's results.

    Ray is joined or started (and a multi-node cluster's storage checked), then the MLflow run
    is created (or, for a run with a checkpoint, continued) and marked FAILED if anything after
    raises. A NaN/inf step beyond ``train.skip_nonfinite`` raises ``NonFiniteError`` (the run FAILED, its checkpoints
    ending at the last good step), a ``train.time_budget`` too short for the warm-up ``ConfigError``; a collapse stop returns ``stopped="collapse"``. A sweep's
    trial names its sweep's MLflow run (``parent_run_id``) and passes its Tune ``callbacks``.
    ``show``: rank 0's lines and a progress bar on this process's console (``rayssl.console``).

    In the main thread, SIGTERM (``ray job stop``) and SIGINT (Ctrl-C) stop the run after its
    step with a checkpoint, within ``run.stop_timeout`` (``rayssl.train.stop``): the MLflow run is
    then KILLED and ``JobStopped`` raised with the line to print and the exit code.
    """
    cfg = launch.cfg
    init_ray(cfg.scaling.address, verbose=cfg.run.verbose or not show)
    check_shared_storage(cfg, len([n for n in ray.nodes() if n["Alive"]]))
    if warning := placement_warning(cfg, ray.cluster_resources()):
        print(warning, flush=True)
    mlflow_run = tracking.start(cfg, f"{launch.path}/{run_name(cfg)}", launch.filesystem, parent_run_id)
    signals = StopSignals(cfg.run.stop_timeout)
    if signals.warning:
        print(signals.warning, flush=True)

    def train():
        with console.Console() if show else contextlib.nullcontext() as shown:
            return build_trainer(launch, mlflow_run, callbacks, shown and shown.queue, signals.key).fit()

    try:
        result = signals.run(train)
    except BaseException as err:
        if signals.signal:  # out of time, a second signal, or an error after the first
            raise stopped(launch, mlflow_run, signals, None, err) from None
        tracking.finish(mlflow_run, failed=True)
        if (stall := find_stall(err)) is not None:  # the watchdog's line, not Ray's wrapping of it
            raise stall from None
        if (outage := data_storage.find_outage(err)) is not None:  # past data.outage_limit_s: its one line
            raise outage from None
        raise
    out = dict(result.return_value or {})
    if out.get("stopped") == SIGNALLED:
        raise stopped(launch, mlflow_run, signals, out)
    if out.get("stopped") in FAILED_STOPS:
        tracking.finish(mlflow_run, failed=True)
        if out["stopped"] == DISK_FULL:
            raise checkpoints.DiskFull(f"{out['stop_reason']}; then relaunch with run.name={run_name(cfg)} to resume")
        raise (NonFiniteError if out["stopped"] == "nonfinite" else ConfigError)(out["stop_reason"])
    out["run_path"] = result.path
    if mlflow_run:
        out["mlflow_run_id"] = mlflow_run.run_id
        out["mlflow"] = tracking.ui_hint(mlflow_run)
    return out


def stopped(launch: Launch, mlflow_run: tracking.MlflowRun | None, signals: StopSignals, out: dict | None,
            err: BaseException | None = None) -> JobStopped:
    """The run after a stop by signal: marked KILLED in MLflow (tags ``rayssl.stopped``, and
    ``rayssl.stopped_step`` when the run stopped cleanly), and the job's one line and exit code.
    ``out``: rank 0's results of a clean stop; else ``err``, why ``fit`` did not return them."""
    cfg, sig = launch.cfg, signals.signal
    name = run_name(cfg)
    folder = run_uri(cfg, f"{launch.path}/{name}")
    tags = {}
    if out is not None and out.get("checkpoint_error"):  # its checkpoint did not fit on the disk
        text = f"stopped by {sig} at step {out['history'][-1]['step']}: {out['checkpoint_error']}"
    elif out is not None:
        step = out["history"][-1]["step"]
        text = f"stopped by {sig} at step {step}: checkpoint of step {step} in {folder}"
        tags["rayssl.stopped_step"] = str(step)
    else:
        if isinstance(err, Unfinished) and err.forced:
            why = "a second signal came before its checkpoint"
        elif isinstance(err, Unfinished):
            why = f"training did not end within {signals.timeout:g} s ({signals.bound})"
        else:
            why = f"training ended with {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        text = f"stopped by {sig}: {why}; {_newest_checkpoint(launch)}"
    tags["rayssl.stopped"] = text
    tracking.mark_stopped(mlflow_run, tags)
    return JobStopped(f"[rayssl] {text}; relaunch with run.name={name} to resume", exit_code(sig),
                      abandoned=isinstance(err, Unfinished))


def _newest_checkpoint(launch: Launch) -> str:
    """Where a relaunch resumes, said in words: the step of the newest checkpoint whose state file
    has its manifest's size (cheap, no hash: the driver must exit in time; the resume itself
    checks the hash too and takes the newest intact one)."""
    fs = launch.filesystem or pyarrow.fs.LocalFileSystem()
    for folder in checkpoints.candidates(fs, f"{launch.path}/{run_name(launch.cfg)}"):  # newest step first
        try:
            with fs.open_input_stream(f"{folder}/{checkpoints.MANIFEST_FILE}") as f:
                manifest = json.loads(f.read())
            if fs.get_file_info(f"{folder}/{checkpoints.CHECKPOINT_FILE}").size == manifest["bytes"]:
                return f"the newest checkpoint is of step {manifest['step']}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "no checkpoint was written"


def pretrain(cfg: Config, started: float | None = None) -> dict:
    """Run (or resume, for an existing ``run.name``) a pretraining job; rank 0's results.
    All inputs are checked before Ray starts (``check_inputs``), then ``fit``. ``started``: the
    job's start (``jobs/pretrain.py``: its process's first line), default now."""
    return fit(check_inputs(cfg, started=started), show=True)
