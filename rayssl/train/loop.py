"""``train_loop_per_worker``: Ray Train's adapter around ``rayssl.train.run.TrainRun``.

It wires the driver's ``WorkerPayload``, the worker's context, its dataset shards,
``ray.train.report`` (with the checkpoint upload), the run folder's checkpoints and rank 0's
MLflow writer into a ``Worker``; the run itself knows nothing of Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs
import ray.train
import ray.train.torch
import ray.train.v2._internal.execution.context as train_context

from rayssl import checkpoint as checkpoints
from rayssl.config import Config
from rayssl.console import Channel
from rayssl.data import storage
from rayssl.data.datasets import online_limits
from rayssl.tracking import RUN_FILE, RunFolder, RunLogger
from rayssl.train.payload import WorkerPayload
from rayssl.train.run import TrainRun
from rayssl.train import watchdog
from rayssl.train.stop import StopPoll
from rayssl.train.worker import Worker


def train_loop_per_worker(payload: WorkerPayload) -> dict:
    """One Ray Train worker: a ``TrainRun`` over this worker's shards; rank 0's results reach the driver."""
    # Ray Train logs every report (all metrics) at INFO on rank 0; the progress line says it shorter.
    # (that module names its logger by its file path, not its module name)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    cfg = Config.model_validate(payload.config)
    ctx, train = ray.train.get_context(), ray.train.get_dataset_shard("train")
    rank = ctx.get_world_rank()

    def train_batches(seed: int, rows: int):
        return train.iter_batches(batch_size=rows, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=cfg.data.shuffle_buffer or None, local_shuffle_seed=seed)

    def sets(*names: str):
        return tuple(ray.train.get_dataset_shard(name).iter_batches(batch_size=512, batch_format="numpy")
                     for name in names)

    channel = Channel(payload.console)  # to the driver's console, else stdout

    def report_to_ray(metrics: dict, state: dict | None) -> None:
        if (folder := report(metrics, state)) is not None:
            channel.say(f"[rayssl] checkpoint of step {metrics['step']}: {payload.run_uri}/{folder}")

    worker = Worker(train_batches, rank=rank, world=ctx.get_world_size(),
                    device=ray.train.torch.get_device(), report=report_to_ray, say=channel.say,
                    progress=channel.progress,
                    restore=lambda say: restore(payload, say),
                    knn_sets=(lambda: sets("knn_bank", "eval")) if payload.meta.num_eval > 0 else None,  # labelled
                    online_knn_sets=(lambda: sets("online_bank", "online_eval")) if online_limits(cfg, payload.meta) else None,
                    gallery_images=(lambda: sets("gallery")[0]) if payload.meta.num_eval == 0 and cfg.eval.gallery_clusters
                    else None,  # no k-NN: the gallery reads its own
                    prepare_model=ray.train.torch.prepare_model,
                    mlflow=run_logger(payload, cfg, channel.say) if rank == 0 else None,
                    job_started=payload.job_started,
                    # the driver's stop request (rayssl.train.stop): rank 0 reads it, TrainRun shares it
                    stop_requested=StopPoll(payload.stop_key if rank == 0 else None),
                    pending=lambda: watchdog.pending_line(cfg.data_cpus))  # the stall watchdog's line
    return TrainRun(cfg, payload.meta, payload.steps_per_epoch, worker).run()


def run_logger(payload: WorkerPayload, cfg: Config, say: Callable[[str], None]) -> RunLogger | None:
    """Rank 0's MLflow writer (None without tracking). It tags the run with this node
    (``rayssl.rank0_node``, newest launch wins: where its logs are, and which node a test may
    remove) and keeps its backlog in the run folder when MLflow does not answer at the end
    (``rayssl.tracking_backlog``)."""
    if payload.mlflow_run is None:
        return None
    folder = RunFolder(payload.filesystem, payload.run_path, payload.run_uri)
    mlflow = RunLogger(payload.mlflow_run, say, run_folder=folder, model_config=cfg.model.model_dump())
    mlflow.tag("rayssl.rank0_node", ray.get_runtime_context().get_node_id())
    return mlflow


def report(metrics: dict, state: dict | None) -> str | None:
    """``ray.train.report`` on every rank; with a state, rank 0 attaches it as a checkpoint and
    returns the checkpoint's folder name in the run folder (None elsewhere).

    The state is written (``rayssl.checkpoint.save``: the file, then its manifest) to a
    temporary folder, which ``upload`` copies to ``run.storage_path``; ``report`` then names the
    copy to Ray (``NO_UPLOAD``) and the folder is removed. Beside it, ``RUN_FILE`` names the MLflow
    run, so a relaunch finds it without loading the state. A disk that cannot take the checkpoint
    (``rayssl.checkpoint.disk_full``) leaves no folder: every rank still reports, so Ray's reports
    stay in step, and then rank 0 raises ``DiskFull``.
    """
    with tempfile.TemporaryDirectory(prefix="rayssl-ckpt-") as tmp:
        checkpoint = folder = full = None
        if state is not None and ray.train.get_context().get_world_rank() == 0:
            folder = f"checkpoint_{time.strftime('%Y-%m-%d_%H-%M-%S')}_step{state['step']:07d}"
            try:
                checkpoint = upload(write(state, Path(tmp)), folder, state["step"], s3_options(state["config"]))
            except checkpoints.DiskFull as err:
                full, folder = err, None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
    if full is not None:
        raise full
    return folder


def write(state: dict, folder: Path) -> Path:
    """The checkpoint's files in the local ``folder`` (``DiskFull`` naming it when its disk is full)."""
    try:
        if state.get("tracking"):
            (folder / RUN_FILE).write_text(json.dumps(state["tracking"]))
        checkpoints.save(state, folder)
    except OSError as err:
        if not checkpoints.disk_full(err):
            raise
        raise checkpoints.no_space(f"{folder} (the local copy; set TMPDIR to a larger disk)", state["step"],
                                   sum(p.stat().st_size for p in folder.iterdir()), shutil.disk_usage(folder).free)
    return folder


def s3_options(config: dict) -> storage.S3Options:
    """What an outage of the run folder needs of a config dict (``Config.model_dump`` or a
    checkpoint's redacted one): the endpoint, the region and ``data.outage_limit_s``; the runs' keys
    (``S3Options.for_runs``, built on the driver) stay in Ray's storage filesystem."""
    data = config.get("data", {})
    return storage.S3Options(data.get("endpoint_url"), data.get("region"),
                             outage_limit_s=data.get("outage_limit_s", storage.OUTAGE_LIMIT_S))


def upload(local: Path, name: str, step: int, options: storage.S3Options) -> ray.train.Checkpoint:
    """The checkpoint's files (``local``) copied into the run folder's ``name``, the manifest last,
    each retried through a storage outage up to ``data.outage_limit_s``
    (``rayssl.data.storage.ride_out``; past it ``StorageOutage``). A folder cut short never holds
    a manifest that matches, so resume passes it over. On a full disk the folder is removed and
    ``DiskFull`` raised: the older checkpoints stay as they were."""
    context = ray.train.get_context().get_storage()
    dest = context.build_checkpoint_path_from_name(name)
    fs = storage.unwrapped(context.storage_filesystem)  # retried here, file by file, named as a checkpoint
    uri = storage.uri_of(fs, dest)
    files = sorted((p for p in local.iterdir() if p.is_file()),
                   key=lambda p: (p.name == checkpoints.MANIFEST_FILE, p.name))

    def put(path: Path) -> None:
        with fs.open_output_stream(f"{dest}/{path.name}") as f:
            f.write(path.read_bytes())

    try:
        storage.ride_out(lambda: fs.create_dir(dest), uri, options, "uploading a checkpoint")
        for path in files:
            storage.ride_out(lambda: put(path), uri, options, "uploading a checkpoint")
    except OSError as err:
        if not checkpoints.disk_full(err):
            raise
        with contextlib.suppress(OSError):
            fs.delete_dir(dest)
        free = shutil.disk_usage(posixpath.dirname(dest)).free if isinstance(fs, pyarrow.fs.LocalFileSystem) else None
        raise checkpoints.no_space(posixpath.dirname(uri), step, sum(p.stat().st_size for p in files), free) from None
    return ray.train.Checkpoint(path=dest, filesystem=context.storage_filesystem)


def restore(payload: WorkerPayload, say_skipped) -> dict | None:
    """The state of the newest *intact* checkpoint in the run folder, or None for a new run.

    The folder is read directly rather than trusting only Ray's latest registered checkpoint:
    a folder whose write or upload was cut short (or that was truncated since) is passed over,
    and one that was fully uploaded just before a worker died is used although Ray never
    registered it. A storage outage is ridden out up to ``data.outage_limit_s``, never taken
    for a missing or damaged checkpoint.
    """
    fs = payload.filesystem or pyarrow.fs.LocalFileSystem()
    skipped: list[str] = []

    def newest():
        skipped.clear()
        return checkpoints.latest_intact(fs, payload.run_path, skipped)

    found = storage.ride_out(newest, payload.run_uri, s3_options(payload.config), "reading checkpoints")
    for folder in skipped:
        say_skipped(f"[rayssl] checkpoint {posixpath.basename(folder)} is incomplete or corrupt: skipped")
    if found is None and ray.train.get_checkpoint() is not None:  # Ray saw one: never restart silently
        raise checkpoints.CheckpointError(f"{payload.run_path}: no intact checkpoint to resume from; "
                                          "start a new run.name (or remove the run folder)")
    return found and found[1]
