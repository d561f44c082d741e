"""``train_loop_per_worker``: Ray Train's adapter around ``rayssl.train.run.TrainRun``.

It wires the worker's context, its dataset shards, ``ray.train.report`` (with the checkpoint
upload) and the run folder's checkpoints into a ``Worker``; the run itself knows nothing of Ray.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import ray.train
import ray.train.torch
import ray.train.v2._internal.execution.context as train_context

from rayssl import checkpoint as checkpoints
from rayssl.config import Config
from rayssl.console import Channel
from rayssl.data.meta import DataMeta
from rayssl.tracking import RUN_FILE, RunFolder
from rayssl.train.run import TrainRun, Worker


def train_loop_per_worker(loop_config: dict) -> dict:
    """One Ray Train worker: a ``TrainRun`` over this worker's shards; rank 0's results reach the driver."""
    # Ray Train logs every report (all metrics) at INFO on rank 0; the progress line says it shorter.
    # (that module names its logger by its file path, not its module name)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    cfg = Config.model_validate(loop_config["config"])
    meta = DataMeta(**loop_config["meta"])
    ctx, train = ray.train.get_context(), ray.train.get_dataset_shard("train")

    def train_batches(seed: int, rows: int):
        return train.iter_batches(batch_size=rows, batch_format="numpy", drop_last=True,
                                  local_shuffle_buffer_size=cfg.data.shuffle_buffer or None, local_shuffle_seed=seed)

    def knn_sets():
        return tuple(ray.train.get_dataset_shard(name).iter_batches(batch_size=512, batch_format="numpy")
                     for name in ("knn_bank", "knn_query"))

    channel = Channel(loop_config.get("console"))  # to the driver's console, else stdout
    run_uri = loop_config["run_uri"]  # the run folder as the user wrote it (s3://...), for the console

    def report_to_ray(metrics: dict, state: dict | None) -> None:
        if (folder := report(metrics, state)) is not None:
            channel.say(f"[rayssl] checkpoint of step {metrics['step']}: {run_uri}/{folder}")

    worker = Worker(train_batches, rank=ctx.get_world_rank(), world=ctx.get_world_size(),
                    device=ray.train.torch.get_device(), report=report_to_ray, say=channel.say,
                    progress=channel.progress,
                    restore=lambda say: restore(loop_config, say),
                    knn_sets=knn_sets if meta.num_eval > 0 else None,  # labelled shards and data.eval_source
                    prepare_model=ray.train.torch.prepare_model, node=ray.get_runtime_context().get_node_id(),
                    job_started=loop_config["job_started"],
                    run_folder=RunFolder(loop_config["filesystem"], loop_config["run_path"], run_uri))
    return TrainRun(cfg, meta, loop_config["steps_per_epoch"], worker, loop_config.get("tracking")).run()


def report(metrics: dict, state: dict | None) -> str | None:
    """``ray.train.report`` on every rank; with a state, rank 0 attaches it as a checkpoint and
    returns the checkpoint's folder name in the run folder (None elsewhere).

    The state is written (``rayssl.checkpoint.save``: the file, then its manifest) to a
    temporary folder that Ray copies to ``run.storage_path`` before ``report`` returns
    (synchronous upload); the folder is then removed. Beside it, ``RUN_FILE`` names the MLflow
    run, so a relaunch finds it without loading the state.
    """
    with tempfile.TemporaryDirectory(prefix="rayssl-ckpt-") as tmp:
        checkpoint = folder = None
        if state is not None and ray.train.get_context().get_world_rank() == 0:
            if state.get("tracking"):
                (Path(tmp) / RUN_FILE).write_text(json.dumps(state["tracking"]))
            checkpoints.save(state, tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            folder = f"checkpoint_{time.strftime('%Y-%m-%d_%H-%M-%S')}_step{state['step']:07d}"
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=folder)
        return folder


def restore(loop_config: dict, say_skipped) -> dict | None:
    """The state of the newest *intact* checkpoint in the run folder, or None for a new run.

    The folder is read directly rather than trusting only Ray's latest registered checkpoint:
    a folder whose write or upload was cut short (or that was truncated since) is passed over,
    and one that was fully uploaded just before a worker died is used although Ray never
    registered it.
    """
    fs = loop_config["filesystem"] or pyarrow.fs.LocalFileSystem()
    skipped: list[str] = []
    found = checkpoints.latest_intact(fs, loop_config["run_path"], skipped)
    for folder in skipped:
        say_skipped(f"[rayssl] checkpoint {posixpath.basename(folder)} is incomplete or corrupt: skipped")
    if found is None and ray.train.get_checkpoint() is not None:  # Ray saw one: never restart silently
        raise checkpoints.CheckpointError(f"{loop_config['run_path']}: no intact checkpoint to resume from; "
                                          "start a new run.name (or remove the run folder)")
    return found and found[1]
