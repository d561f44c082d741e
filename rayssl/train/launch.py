"""Driver side, the one launch path of ``jobs/pretrain.py`` and of every Tune trial.

    launch = check_inputs(cfg)   # config, storage, data, batch size: all before Ray starts
    fit(launch)                  # MLflow run, Ray, datasets, TorchTrainer.fit, FAILED on error
"""

from __future__ import annotations

import contextlib
import math
import os
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
from rayssl.train.run import FAILED_STOPS
from rayssl.train.step import NonFiniteError


def init_ray(address: str | None, min_cpus: float = 0, verbose: bool = True) -> None:
    """Join ``scaling.address`` / ``RAY_ADDRESS`` (e.g. inside ``ray job submit``) or start a
    local Ray with at least ``min_cpus`` logical CPUs (oversubscribing a small machine).

    Not ``verbose`` (``run.verbose=false``): the processes' output and Ray's driver-side logs
    stay in Ray's log folder (``rayssl-driver.log`` beside the workers' logs); rank 0's lines
    reach the console through ``rayssl.console``.
    """
    if ray.is_initialized():
        return
    if not verbose:
        console.quiet_ray_logs()
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=verbose)
    else:
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=verbose,
                 num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)))
    if not verbose:
        console.driver_log(ray_logs_dir())


def ray_logs_dir() -> str | None:
    """Ray's log folder of this session on the driver's node (None if Ray does not say)."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return node.get_logs_dir_path() if node is not None else None


def storage(cfg: Config) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig, checked writable.

    Local paths become absolute (Ray requires it); ``s3://`` gets the explicit pyarrow S3
    filesystem of ``rayssl.data.storage`` (``data.access_key_id``/``data.secret_access_key`` or the
    AWS chain, ``data.endpoint_url``, region, retries).
    """
    path = cfg.run.storage_path
    s3 = data_storage.S3Options.of(cfg.data)
    try:
        data_storage.check_writable(path, s3)
    except data_storage.StorageError as err:
        raise data_storage.StorageError(f"run.storage_path: {err}") from None
    if data_storage.is_s3(path):
        fs, bucket_path = data_storage.resolve(path, s3)
        return bucket_path, fs
    return str(Path(path).expanduser().resolve()), None


def build_trainer(launch: Launch, tracking_settings: tracking.MlflowRun | None, callbacks: list | None = None,
                  console_queue=None) -> TorchTrainer:
    """The TorchTrainer of a checked launch, with the MLflow run from ``rayssl.tracking.start``
    (or None), Train ``callbacks`` (a sweep's report to Tune) and the driver's console queue
    (``rayssl.console``; None: rank 0 prints)."""
    cfg, path, filesystem = launch.cfg, launch.path, launch.filesystem
    s = cfg.scaling
    datasets, run_path = build_datasets(cfg, launch.data), f"{path}/{run_name(cfg)}"
    ordered = ("knn_bank", "knn_query") + (("train",) if cfg.data.deterministic else ())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(), "meta": launch.data.meta.to_dict(),
                           "tracking": tracking_settings, "steps_per_epoch": launch.steps_per_epoch,
                           "run_path": run_path, "run_uri": run_uri(cfg, run_path),
                           "filesystem": filesystem, "console": console_queue, "job_started": launch.started},
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
    """Every input check, before Ray starts: storage writable, data found, the batch fits the
    data. Each failure is one line naming the field. Only a first Fashion-MNIST run starts Ray
    here (``init_ray(scaling.address, min_cpus)``), after its checks, to build the shards.
    ``started``: when the job started (default: now)."""
    started = time.time() if started is None else started
    path, filesystem = storage(cfg)
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
    """
    cfg = launch.cfg
    init_ray(cfg.scaling.address, verbose=cfg.run.verbose or not show)
    check_shared_storage(cfg, len([n for n in ray.nodes() if n["Alive"]]))
    if warning := placement_warning(cfg, ray.cluster_resources()):
        print(warning, flush=True)
    settings = tracking.start(cfg, f"{launch.path}/{run_name(cfg)}", launch.filesystem, parent_run_id)
    try:
        with console.Console() if show else contextlib.nullcontext() as shown:
            result = build_trainer(launch, settings, callbacks, shown and shown.queue).fit()
    except BaseException:
        tracking.finish(settings, failed=True)
        raise
    out = dict(result.return_value or {})
    if out.get("stopped") in FAILED_STOPS:
        tracking.finish(settings, failed=True)
        raise (NonFiniteError if out["stopped"] == "nonfinite" else ConfigError)(out["stop_reason"])
    out["run_path"] = result.path
    if settings:
        out["mlflow_run_id"] = settings.run_id
        out["mlflow"] = tracking.ui_hint(settings)
    return out


def pretrain(cfg: Config, started: float | None = None) -> dict:
    """Run (or resume, for an existing ``run.name``) a pretraining job; rank 0's results.
    All inputs are checked before Ray starts (``check_inputs``), then ``fit``. ``started``: the
    job's start (``jobs/pretrain.py``: its process's first line), default now."""
    return fit(check_inputs(cfg, started=started), show=True)
