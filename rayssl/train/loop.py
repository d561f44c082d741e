"""``train_loop_per_worker``: what each Ray Train worker runs."""

from __future__ import annotations

import copy
import json
import logging
import posixpath
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs
import ray.train
import ray.train.torch
import ray.train.v2._internal.execution.context as train_context
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rayssl import checkpoint as checkpoints
from rayssl.config import Config
from rayssl.data.datasets import DataMeta
from rayssl.data.images import decode_batch
from rayssl.knn import merge_neighbours, topk_neighbours, weighted_vote
from rayssl.models import build_encoder, make_teacher, unwrap
from rayssl.monitor import CollapseAlarm
from rayssl.objective import ClusterObjective, ObjectiveSpec
from rayssl.schedules import build_schedules, online_knn_every
from rayssl.tracking import RUN_FILE, RunLogger, checkpoint_record
from rayssl.train.step import NonFiniteError, Stepper, build_optimizer, use_bf16
from rayssl.transforms import MultiCrop



def _images(batch: dict, device: torch.device) -> torch.Tensor:
    """Decoded uint8 (B, H, W, C) numpy rows that decoded -> uint8 (B', C, H, W) tensor."""
    x = torch.from_numpy(np.array(batch["image"][batch["ok"]]))  # a writable copy
    return x.permute(0, 3, 1, 2).to(device, non_blocking=True)


class Views:
    """Training batches -> normalised multi-crop views, skipping (and counting) undecodable images.

    With ``data.decode_on=data`` the batch already holds uint8 views from Ray Data; with
    ``worker`` it holds encoded images that are decoded here and cropped on the device.
    """

    def __init__(self, cfg: Config, meta: DataMeta, device: torch.device) -> None:
        self.cfg, self.meta, self.device = cfg, meta, device
        self.crops = MultiCrop(cfg.augment, meta.channels, meta.mean, meta.std)
        self.skipped = 0

    def __call__(self, batch: dict) -> list[torch.Tensor] | None:
        """The views of the batch's decodable images, or None when none decoded."""
        if self.cfg.data.decode_on == "worker":
            images, ok = decode_batch(batch["image"], self.meta.channels, self.meta.image_size)
        else:
            ok = batch["ok"]
        self.skipped += int((~ok).sum())
        if not ok.any():
            return None
        if self.cfg.data.decode_on == "worker":
            x = torch.from_numpy(images[ok]).permute(0, 3, 1, 2).to(self.device, non_blocking=True)
            return self.crops(x)
        keys = sorted((k for k in batch if k.startswith("view_")), key=lambda k: int(k[5:]))
        views = [torch.from_numpy(np.array(batch[k][ok])).to(self.device, non_blocking=True) for k in keys]
        return [self.crops.normalize(v.float() / 255) for v in views]


def _global_sum(value: int) -> int:
    t = torch.tensor(float(value))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return int(t)


def _all_gather(obj):
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _extract(shard, fn, device, batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``fn(images) -> list of (B, D) features`` over the decodable rows of a shard."""
    feats, labels = [], []
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        if not batch["ok"].any():
            continue
        out = fn(_images(batch, device))
        feats.append([F.normalize(f.float(), dim=1).cpu() for f in out])
        labels.append(torch.from_numpy(np.array(batch["label"][batch["ok"]])))
    return [torch.cat(f) for f in zip(*feats)], torch.cat(labels)


def knn_eval(cfg: Config, meta: DataMeta, fn, names: list[str], device) -> dict[str, float]:
    """Weighted k-NN accuracy of each feature set ``fn`` returns, bank sharded over workers.

    Each worker extracts its shard of the bank (labelled training images) and of the queries
    (``data.eval_source``); queries are gathered, each worker returns its local top-k, and
    the exact global top-k is merged.
    """
    bank, bank_labels = _extract(ray.train.get_dataset_shard("knn_bank"), fn, device, 512)
    query, query_labels = _extract(ray.train.get_dataset_shard("knn_query"), fn, device, 512)
    all_queries = _all_gather((query, query_labels))
    query_labels = torch.cat([q[1] for q in all_queries])
    results = {}
    for i, name in enumerate(names):
        q = torch.cat([parts[0][i] for parts in all_queries])
        local = topk_neighbours(bank[i], bank_labels, q, cfg.eval.knn_k)
        sims, labels = merge_neighbours(_all_gather(local), cfg.eval.knn_k)
        pred = weighted_vote(sims, labels, meta.num_classes, cfg.eval.knn_temperature)
        results[name] = float((pred == query_labels).float().mean())
    return results


def _report(metrics: dict, state: dict | None) -> None:
    """``ray.train.report`` on every rank; with a state, rank 0 attaches it as a checkpoint.

    The state is written (``rayssl.checkpoint.save``: the file, then its manifest) to a
    temporary folder that Ray copies to ``run.storage_path`` before ``report`` returns
    (synchronous upload); the folder is then removed. Beside it, ``RUN_FILE`` names the MLflow
    run, so a relaunch finds it without loading the state.
    """
    with tempfile.TemporaryDirectory(prefix="rayssl-ckpt-") as tmp:
        checkpoint = None
        if state is not None and ray.train.get_context().get_world_rank() == 0:
            if state.get("tracking"):
                (Path(tmp) / RUN_FILE).write_text(json.dumps(state["tracking"]))
            checkpoints.save(state, tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


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


def say(line: str) -> None:
    """One line to the driver's console (Ray Train's patched ``print`` would show it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _progress(step: int, total: int, metrics: dict, started: float, first_step: int) -> str:
    done = step + 1 - first_step
    eta = (time.time() - started) / max(done, 1) * (total - step - 1)
    return (f"[rayssl] step {step + 1}/{total} ({100 * (step + 1) / total:.0f}%) "
            f"epoch {metrics['epoch']:.2f} loss {metrics['loss']:.3f} "
            f"I(X;K) {metrics['norm/mutual_information']:.2f} "
            f"eff.clusters {metrics['norm/effective_clusters']:.0f} "
            f"{metrics['images_per_second']:.0f} img/s ETA {eta / 60:.1f} min")


def train_loop_per_worker(loop_config: dict) -> dict:
    cfg = Config.model_validate(loop_config["config"])
    # Ray Train logs every report (all metrics) at INFO on rank 0; the progress line says it shorter.
    # (that module names its logger by its file path, not its module name)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    meta = DataMeta(**loop_config["meta"])
    steps_per_epoch: int = loop_config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    bf16 = use_bf16(cfg.train.precision, device)

    torch.manual_seed(cfg.train.seed)  # same initial weights on every worker
    student = build_encoder(cfg.model, meta.channels, cfg.augment.global_crop_size, cfg.objective.num_clusters)
    student = student.to(memory_format=torch.channels_last)  # 1.7x faster convs on CPU (oneDNN)
    teacher = make_teacher(student).to(device)
    objective = ClusterObjective(ObjectiveSpec.from_mapping(cfg.objective.model_dump())).to(device)
    student = ray.train.torch.prepare_model(student)
    optimizer = build_optimizer(student, cfg.optim)
    global_batch = cfg.train.batch_size * cfg.optim.accumulate_steps * world
    schedules = build_schedules(cfg, steps_per_epoch, global_batch)
    total_steps = len(schedules["lr"])
    stepper = Stepper(student, teacher, objective, optimizer, schedules, cfg, steps_per_epoch, device, bf16)
    views_of = Views(cfg, meta, device)
    crops = views_of.crops
    knn = meta.num_eval > 0  # labelled training shards and data.eval_source
    tracking = loop_config.get("tracking")
    mlflow_run = RunLogger(tracking, say) if tracking and rank == 0 else None
    alarm = CollapseAlarm.of(cfg.monitor)

    start_step, results, position = 0, {}, 0
    state = restore(loop_config, say if rank == 0 else lambda line: None)
    if state is not None:
        stepper.load_state_dict(state)
        start_step, results = state["step"], state["results"]
        skipped_before = state.get("skipped_images", 0)
        results["resumed_from_step"] = start_step
        torch.set_rng_state(state["rng"][rank % len(state["rng"])])
        if cfg.data.deterministic and "data_position" in state:
            position = state["data_position"][rank % len(state["data_position"])]
        if rank == 0:
            say(f"[rayssl] resumed from step {start_step}/{total_steps}")
    else:
        torch.manual_seed(cfg.train.seed + 1000 * rank)  # different crops on every worker
        skipped_before = 0

    def features(model):
        def fn(x):
            model.eval()
            with torch.no_grad(), stepper.autocast:
                x = crops.eval_transform(x, cfg.augment.global_crop_size)
                f = unwrap(model).features(x.contiguous(memory_format=torch.channels_last))
            return [f]
        return fn

    if rank == 0 and not knn:
        say("[rayssl] k-NN evaluation skipped: it needs labelled data.source and data.eval_source shards")
    if start_step == 0 and cfg.eval.baselines and knn:
        def baselines(x):
            return [x.flatten(1).float() / 255, *features(teacher)(x)]
        results.update({f"knn/{k}": v for k, v in knn_eval(
            cfg, meta, baselines, ["raw_pixels", "random_init"], device).items()})
        if rank == 0:
            say(f"[rayssl] k-NN baselines: raw pixels {results['knn/raw_pixels']:.2%}, "
                  f"random init {results['knn/random_init']:.2%}")

    def state_dict(step: int) -> dict:
        return {**stepper.state_dict(), "step": step, "results": results, "config": cfg.redacted(mask=None),
                "tracking": checkpoint_record(tracking),
                "meta": meta.to_dict(),
                "skipped_images": history[-1]["data/skipped_images"],
                "rng": _all_gather(torch.get_rng_state()), "data_position": _all_gather(position)}

    shard = ray.train.get_dataset_shard("train")
    # online k-NN every eval.every_epochs (at a logged step, so all workers evaluate together)
    online_every = online_knn_every(cfg, steps_per_epoch) if knn else 0
    step, started = start_step, time.time()
    window_start, window_images, wait = time.time(), 0, 0.0
    losses: list[torch.Tensor] = []
    history: list[dict] = []  # this launch's reported metrics, returned to the driver
    stopped, last_checkpoint = None, start_step
    while step < total_steps and stopped is None:
        epoch_steps = min(steps_per_epoch - step % steps_per_epoch, total_steps - step)
        batches = iter(shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                          drop_last=True, local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                                          local_shuffle_seed=_shuffle_seed(cfg, step, steps_per_epoch, rank)))
        for _ in range(position):  # data.deterministic: the batches this epoch used before the resume
            next(batches, None)
        for _ in range(epoch_steps):
            student.train(), teacher.train()
            for micro in range(cfg.optim.accumulate_steps):
                t0, views = time.time(), None
                while views is None:  # a batch with no decodable image is skipped whole
                    batch = next(batches, None)
                    if batch is None:
                        raise RuntimeError(f"worker {rank}: data shard ran out at step {step}; "
                                           "set train.steps_per_epoch lower")
                    position += 1
                    views = views_of(batch)
                wait += time.time() - t0
                stepper.micro_batch(views, step, micro == cfg.optim.accumulate_steps - 1)
                window_images += len(views[0]) * world
            try:
                losses += stepper.finish(step)
            except NonFiniteError as err:
                stopped = "nonfinite"
                results["stop_reason"] = (f"{err}; {_kept(last_checkpoint)}: lower optim.lr, raise "
                                          "objective.teacher_temperature, set train.precision=fp32 or "
                                          "train.skip_nonfinite")
                break
            step += 1
            if step % steps_per_epoch == 0:  # every rank: the usage statistics are all-reduced
                position = 0
                prior, assigned = stepper.usage.collect()
                if mlflow_run:
                    mlflow_run.epoch_plots(step // steps_per_epoch, prior, assigned)
            log_now = step % cfg.train.log_every == 0 or step == total_steps
            ckpt_now = step % cfg.train.checkpoint_every == 0 or step == total_steps
            if not (log_now or ckpt_now):
                continue
            loss = float(torch.stack(losses).mean()) if losses else float("nan")  # nan: all skipped
            if online_every and step % online_every == 0 and step < total_steps:
                online = knn_eval(cfg, meta, features(teacher), ["teacher"], device)["teacher"]
            else:
                online = None
            elapsed = time.time() - window_start
            metrics = {"step": step, "epoch": step / steps_per_epoch, "loss": loss,
                       "lr": float(schedules["lr"][step - 1]), "wd": float(schedules["wd"][step - 1]),
                       "momentum": float(schedules["momentum"][step - 1]),
                       "teacher_temperature": float(schedules["teacher_temperature"][step - 1]),
                       "images_per_second": window_images / elapsed,
                       "data_wait_fraction": wait / elapsed,
                       "data/skipped_images": _global_sum(views_of.skipped) + skipped_before,
                       "nonfinite_steps": stepper.nonfinite_steps,
                       **stepper.diagnostics(), **({"knn/teacher": online} if online is not None else {})}
            if rank == 0:
                say(_progress(step - 1, total_steps, metrics, started, start_step))
            if ckpt_now and not _finite(student, teacher):  # a finite loss can still leave inf weights
                stopped = "nonfinite"
                results["stop_reason"] = f"non-finite weights after step {step}; {_kept(last_checkpoint)}: lower optim.lr"
                break
            collapse = alarm.observe(step, metrics)
            if collapse:
                if rank == 0:
                    say(f"[rayssl] WARNING {collapse}")
                if mlflow_run:
                    mlflow_run.tag("rayssl.collapse", collapse)
                if cfg.monitor.stop_on_collapse:
                    stopped, results["stop_reason"], metrics["stopped"] = "collapse", collapse, "collapse"
                    ckpt_now = True
            history.append(metrics)
            if mlflow_run:
                mlflow_run.metrics(step, metrics)
            _report(metrics, state_dict(step) if ckpt_now else None)
            last_checkpoint = step if ckpt_now else last_checkpoint
            losses, window_start, window_images, wait = [], time.time(), 0, 0.0
            if stopped:
                break

    if stopped:
        results["stopped"] = stopped
        if rank == 0:
            say(f"[rayssl] stopped: {results['stop_reason']}")
        if mlflow_run:
            mlflow_run.tag("rayssl.stopped", results["stop_reason"])
    if stopped == "nonfinite":  # the driver marks the MLflow run FAILED
        ray.train.report({"step": step, **results})
        return {**results, "history": history}
    if knn:
        results["knn/teacher"] = knn_eval(cfg, meta, features(teacher), ["teacher"], device)["teacher"]
        if rank == 0:
            say(f"[rayssl] teacher k-NN {results['knn/teacher']:.2%}")
    results["train_seconds"] = time.time() - started
    if mlflow_run:
        finish_tracking(mlflow_run, cfg, meta, teacher, results, step)
    ray.train.report({"step": step, **results})
    return {**results, "history": history}


def _kept(last_checkpoint: int) -> str:
    if last_checkpoint == 0:
        return "no checkpoint was saved"
    return f"nothing saved after the checkpoint of step {last_checkpoint}"


def _finite(*models: torch.nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one host sync; at checkpoint steps)."""
    checks = [t.isfinite().all() for m in models for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(checks).all())


def _shuffle_seed(cfg: Config, step: int, steps_per_epoch: int, rank: int) -> int:
    """The local shuffle seed of the pass that starts at ``step``: per epoch with
    ``data.deterministic`` (a resume replays its epoch), otherwise per pass."""
    if cfg.data.deterministic:
        return cfg.train.seed + 7919 * (step // steps_per_epoch) + rank
    return cfg.train.seed + step + rank


def finish_tracking(run: RunLogger, cfg: Config, meta: DataMeta, teacher: torch.nn.Module,
                    results: dict, step: int) -> None:
    """Rank 0, after the last step: results, training curves, the teacher's backbone."""
    run.results(results, step)
    run.curves(f"{cfg.objective.mode}, K={cfg.objective.num_clusters}, {cfg.model.backbone}")
    if run.settings.get("log_model"):
        backbone = copy.deepcopy(unwrap(teacher).backbone).float().cpu().eval()
        size = cfg.augment.global_crop_size
        example = np.random.default_rng(0).standard_normal((2, meta.channels, size, size)).astype(np.float32)
        run.model(backbone, example, {"input": "normalised images (N, C, H, W); see preprocessing",
                                      "image_size": size, "channels": meta.channels,
                                      "mean": list(meta.mean), "std": list(meta.std)})
    run.end()
