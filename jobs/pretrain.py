"""Pretrain an image backbone by clustering SSL on Ray.

    python jobs/pretrain.py                                   # Fashion-MNIST, local Ray
    python jobs/pretrain.py --config configs/fashion_mnist.yaml objective.mode=center train.epochs=3
    python jobs/pretrain.py data.source=s3://bucket/train data.eval_source=s3://bucket/val   # shards from make_shards.py
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pretrain.py
"""

from __future__ import annotations

import time

STARTED = time.time()  # the job's clock (train.time_budget_scope=job), read before the imports

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"

TUNING = """
data:
  data.source               shards written by jobs/make_shards.py (local path or s3://bucket/prefix);
                            'fashion-mnist' builds its shards once under data.cache_dir.
  data.eval_source          labelled shards for the k-NN evaluation (needs labelled data.source too).
  data.decode_on            data (default): decode + multi-crop in Ray Data CPU tasks, so GPU workers
                            only train; give the cluster spare CPUs. worker: decode in the training
                            process and crop on its device; try it when CPUs are scarce and GPUs idle.
                            Watch data_wait_fraction: above ~0.1 the input pipeline is the bottleneck.
  data.shuffle_buffer       rows per worker's local shuffle buffer (file order is shuffled each epoch);
                            raise it when shards are sorted by class.
  data.endpoint_url         MinIO/Ceph endpoint (or AWS_ENDPOINT_URL); credentials come from the
                            AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, role).
  data.image_size           decoded size before cropping; default: the shards' size, else 8/7 of
                            augment.global_crop_size (256 for 224 crops).

tuning advice:
  objective.mode            prior (exact inverse cluster prior, default), center (DINO),
                            sinkhorn (prior repeated objective.sinkhorn_iters times), none (collapses;
                            a control). Watch norm/mutual_information: near 0 means collapse.
  objective.teacher_temperature
                            0.04 works; if I(X;K) falls or loss stalls early, lower it, or warm it
                            up from objective.teacher_temperature_warmup over
                            objective.teacher_temperature_warmup_epochs.
  objective.num_clusters    K; 256-1024 for small data, 65536 for ImageNet. Too large a K for the
                            batch leaves unused clusters (see norm/unused_clusters).
  objective.prior_momentum  0 = per-batch prior; 0.9-0.99 smooths it when the global batch is small.
  objective.scope           global (default): pi and the centre over every worker's batch, all-reduced.
                            local: each worker's own batch; only for the ablation in docs/benchmarks.md.
  augment.color_jitter      brightness/contrast strength s (torchvision ColorJitter(s, s, s/2, s/4)); 0.4 is
                            DINO's. On Fashion-MNIST 0.4 scored 2.1 points of k-NN above 0.16 (docs/benchmarks.md).
  model.head_norm           BatchNorm in the projection MLP: the convnet choice (+1.9 k-NN points on
                            Fashion-MNIST); leave it off for ViTs, as DINO does.
  train.precision           auto: bf16 on GPUs and on CPUs with AVX-512 BF16 / AMX (2x faster here at equal
                            k-NN); fp32 elsewhere. Force fp32 if the loss goes non-finite.
  optim.teacher_momentum    0.99 for short runs, 0.996 (DINO) for long ones; the EMA ends at
                            optim.teacher_momentum_end.
  optim.lr                  peak LR per 256 images (scaled by the global batch); lower it first if
                            the loss goes non-finite.
  train.time_budget         wall-clock time (90s, 12m, 8h), the default's way to size a run: after its first
                            timed steps the run fixes its total steps (say "budget 14m for the job: 1,339
                            steps (5.7 epochs) at 548 img/s, ...") and lays every schedule over it; at most
                            train.epochs epochs. train.time_budget=null: exactly train.epochs epochs.
                            A resumed or restarted run keeps the total it fixed (MLflow param train.total_steps).
  train.time_budget_scope   job (the default config): the budget is the whole job, start to exit; the run
                            subtracts the start-up and baselines it spent and keeps the baselines' k-NN time
                            for the final one. training: the budget is training alone (sweeps: equal-time trials).
  train.batch_size          per worker; the global batch is batch_size x accumulate_steps x workers
                            (the max of an elastic range [min, max]: fewer workers accumulate more).
  scaling.num_workers, scaling.use_gpu, scaling.cpus_per_worker
                            one worker per GPU; on CPU, cpus_per_worker sets torch threads (and
                            below 1 leaves room for Ray Data on small machines).
  run.name                  relaunching with the same name resumes from its latest checkpoint.
  tracking.uri              MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///<run.storage_path>/mlflow.db.
                            On a multi-node cluster point it at an MLflow server (rank 0 may run on any node).
  tracking.experiment, tracking.run_name, tracking.register_as (register the backbone as a model),
  tracking.required=false   train on (with a warning) when the MLflow server is unreachable.
  eval.every_epochs         online teacher k-NN (metric knn/teacher) every N epochs; each costs one pass
                            over the bank (eval.knn_train_limit) and the queries (data.test_limit).
  eval.precise_bn_images    every k-NN row's BatchNorm statistics are recomputed on this many clean bank
                            images first (10k; held in memory: lower it for large images; 0 keeps
                            training's); eval.centre=false turns off centring by the bank mean.

reliability:
  run.max_failures          restarts after a lost worker (preemption, OOM, dead node), each from the newest
                            intact checkpoint (at most train.checkpoint_every steps are recomputed); -1: no limit.
  run.stop_timeout          SIGTERM (ray job stop, a deleted RayJob) or Ctrl-C: the run finishes its step, writes a
                            checkpoint and exits 143 / 130 within this many seconds (30), MLflow status KILLED
                            (tags rayssl.stopped, rayssl.stopped_step); relaunch with the same run.name to resume.
                            A second signal exits at once. ray job stop SIGKILLs after RAY_JOB_STOP_WAIT_TIME_S (3 s):
                            submit with --runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "40"}}'.
  run.storage_path          checkpoints and (by default) the MLflow store. A full disk stops the run at its next
                            checkpoint with one line (exit code 1): that checkpoint is removed, the older ones stay
                            intact; free space and relaunch with the same run.name to resume.
  run.stall_timeout         a worker that gets no batch this long (180 s; 100 step times once timed) ends the run
                            with one line naming what Ray cannot place (its pending demands), not a silent hang.
  data.cpus_per_task        CPUs each Ray Data task asks for; default the workers' share below 1 (0.5 here), so
                            reads fit beside fractional workers on small nodes.
  train.skip_nonfinite      NaN/inf steps to skip (no update) before stopping; 0 stops at the first, keeping the
                            last good checkpoint (exit code 1).
  monitor.min_effective_clusters, monitor.min_mutual_information, monitor.patience
                            collapse alarm: effective clusters (partial collapse; default 7) or I(X;K)
                            (uniform collapse; 0.05 nats) of the normalised teacher below its threshold for
                            monitor.patience logged steps warns and tags the MLflow run (rayssl.collapse);
  monitor.stop_on_collapse  ... and stops the run (exit code 3).
  data.deterministic        replayable data order (with data.decode_on=worker): a resumed run ends bitwise
                            equal to an uninterrupted one on CPU. Slower; for debugging.
"""


def final_report(cfg, results: dict, wall_seconds: float) -> str:
    """The run's report (``rayssl.report``), also logged to its MLflow run as ``report.md``. It
    says so when MLflow's backlog was left in the run folder; ``report.md`` joins that backlog
    when MLflow cannot take it either."""
    from rayssl import report, tracking
    from rayssl.data.storage import S3Options
    from rayssl.tracking_backlog import RunFolder, pending
    from rayssl.train.launch import run_uri

    folder = RunFolder.of(run_uri(cfg, results["run_path"]), S3Options.of(cfg.data))
    left = "mlflow_run_id" in results and pending(folder)
    text = report.render(results, cfg.redacted(), wall_seconds, folder.uri, results.get("mlflow"),
                         folder.uri if left else None)
    if "mlflow_run_id" in results:
        tracking.log_report(tracking.tracking_uri(cfg), results["mlflow_run_id"], text, folder)
    return text


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The job; ``started``: when it started (the process's first line), default now."""
    parser = argparse.ArgumentParser(
        description="Distributed self-supervised pretraining by clustering (rayssl).",
        epilog=TUNING, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: configs/fashion_mnist.yaml)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Ray Data's logs on the console too (run.verbose=true); by default "
                             "they go to Ray's log folder and the console shows rayssl's lines and a progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. objective.mode=center train.epochs=3")
    args = parser.parse_args(argv)
    started = time.time() if started is None else started
    try:
        cfg = load_config(args.config, args.overrides + (["run.verbose=true"] if args.verbose else []))
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")

    from rayssl.checkpoint import DiskFull
    from rayssl.train.launch import pretrain
    from rayssl.train.step import NonFiniteError
    from rayssl.train.watchdog import StallError
    from rayssl.train.stop import JobStopped

    try:
        results = pretrain(cfg, started)
    except ConfigError as err:  # inputs found wrong once Ray and the data are in reach
        parser.exit(2, f"error: {err}\n")
    except NonFiniteError as err:
        parser.exit(1, f"stopped: {err}\n")
    except DiskFull as err:  # a checkpoint run.storage_path's disk could not take; the older ones are intact
        parser.exit(1, f"stopped: {err}\n")
    except StallError as err:  # no batch within run.stall_timeout: the line names what Ray cannot place
        parser.exit(1, f"{err}\n")
    except JobStopped as err:  # SIGTERM (ray job stop) or SIGINT (Ctrl-C): the run is KILLED in MLflow
        if err.abandoned:  # training still runs in a thread: exit now, before `ray job stop`'s SIGKILL
            print(err, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(err.code)
        parser.exit(err.code, f"{err}\n")
    print("\n" + final_report(cfg, results, time.time() - started))
    if results.get("stopped") == "collapse":
        print(f"stopped early: {results['stop_reason']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(started=STARTED))
