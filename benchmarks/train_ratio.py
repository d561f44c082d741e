"""Images/s of the rayssl step in a Ray Train worker fed by Ray Data vs a plain PyTorch loop.

    python benchmarks/train_ratio.py                         # convnet4, batch 128, 1 thread each
    python benchmarks/train_ratio.py --repeats 5 --steps 80 model.width=64

Plain: one process, ``torch.set_num_threads(scaling.cpus_per_worker)``, Fashion-MNIST images
already in memory as uint8 tensors, the same ``Stepper`` (backbone, head, multi-crop on the
worker's device, loss, AdamW, EMA teacher) rayssl trains with. Ray: ``rayssl.train.launch.pretrain``
with one worker of ``scaling.cpus_per_worker`` CPUs, reading the Parquet shards through Ray
Data (decode and crops in Ray Data tasks, the default ``data.decode_on=data``), tracking off.
Both report images/s over windows of ``train.log_every`` steps after the first window; the
ratio is median(Ray) / median(plain), the runs interleaved. Prints a table, writes
``docs/benchmarks/train_ratio.json`` and logs an MLflow run (experiment ``rayssl-benchmarks``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import load_config  # noqa: E402
from rayssl.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from rayssl.models import build_encoder, make_teacher  # noqa: E402
from rayssl.objective import ClusterObjective  # noqa: E402
from rayssl.schedules import build_schedules  # noqa: E402
from rayssl.train.step import Stepper, build_optimizer  # noqa: E402
from rayssl.transforms import MultiCrop  # noqa: E402

OUT = ROOT / "docs/benchmarks/train_ratio.json"


def plain_loop(cfg, images: np.ndarray, steps: int) -> list[float]:
    """Images/s per window of ``train.log_every`` steps (the first window dropped)."""
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    b, device = cfg.train.batch_size, torch.device("cpu")
    student = build_encoder(cfg.model, 1, cfg.augment.global_crop_size, cfg.objective.num_clusters)
    student = student.to(memory_format=torch.channels_last)
    objective = ClusterObjective(cfg.objective)
    schedules = build_schedules(cfg, steps, b)
    stepper = Stepper(student, make_teacher(student), objective, build_optimizer(student, cfg.optim), schedules,
                      cfg, steps, device, False)
    mean, std = float(images.mean() / 255), float(images.std() / 255)
    crops = MultiCrop(cfg.augment, 1, (mean,), (std,))
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 28, 28) uint8
    rates, window_start = [], time.perf_counter()
    for step in range(steps):
        i = (step * b) % (len(x) - b)
        stepper.micro_batch(crops(x[i:i + b]), step, True)
        stepper.finish(step)
        if (step + 1) % cfg.train.log_every == 0:
            now = time.perf_counter()
            rates.append(b * cfg.train.log_every / (now - window_start))
            window_start = now
    return rates[1:]


def ray_run(cfg, steps: int, storage: str, index: int) -> list[float]:
    from rayssl.train.launch import pretrain

    run = cfg.model_copy(deep=True)
    run.run.name, run.run.storage_path = f"ratio-{index}-{time.strftime('%H%M%S')}", storage
    result = pretrain(run)
    return [m["images_per_second"] for m in result["history"]][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="interleaved pairs of runs (the median is reported)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (windows of train.log_every)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both loops")
    args = p.parse_args()
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "tracking.enabled=false", "eval.baselines=false",
        "train.log_every=10", f"train.steps_per_epoch={args.steps}", "train.epochs=1", "train.time_budget=null",
        f"train.checkpoint_every={args.steps}", "eval.knn_train_limit=512", "data.eval_limit=256",
        *args.overrides])
    images, _ = load_fashion_mnist(cfg.data.fashion_mnist_dir, "train", 20000)

    from rayssl.train.launch import init_ray

    init_ray(cfg.scaling.address, min_cpus=cfg.scaling.cpus_per_worker + 1)
    plain, ray_rates = [], []
    with tempfile.TemporaryDirectory(prefix="rayssl-bench-") as storage:
        for i in range(args.repeats):
            plain.append(statistics.median(plain_loop(cfg, images, args.steps)))
            ray_rates.append(statistics.median(ray_run(cfg, args.steps, storage, i)))
            print(f"repeat {i + 1}: plain {plain[-1]:.1f} img/s, Ray Train + Ray Data {ray_rates[-1]:.1f} img/s",
                  flush=True)
    result = {"plain_images_per_second": plain, "ray_images_per_second": ray_rates,
              "ratio": statistics.median(ray_rates) / statistics.median(plain),
              "steps": args.steps, "batch_size": cfg.train.batch_size, "threads": cfg.scaling.cpus_per_worker,
              "backbone": cfg.model.backbone, "width": cfg.model.width, "num_clusters": cfg.objective.num_clusters,
              "overrides": args.overrides, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"\n| loop | images/s (median of {args.repeats}) |\n|---|---|\n"
          f"| plain PyTorch, in-memory tensors | {statistics.median(plain):.1f} |\n"
          f"| Ray Train worker + Ray Data | {statistics.median(ray_rates):.1f} |\n"
          f"| ratio | {result['ratio']:.3f} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    log_mlflow("train_ratio", result, OUT)


def log_mlflow(name: str, result: dict, *artifacts: Path) -> None:
    """One run in experiment ``rayssl-benchmarks`` of the default store (see rayssl.tracking)."""
    import mlflow

    from rayssl.tracking import default_uri

    mlflow.set_tracking_uri(default_uri())
    mlflow.set_experiment("rayssl-benchmarks")
    with mlflow.start_run(run_name=name):
        mlflow.log_params({k: v for k, v in result.items() if not isinstance(v, (list, dict))})
        mlflow.log_metrics({k: v for k, v in result.items() if isinstance(v, float)})
        for artifact in artifacts:
            mlflow.log_artifact(str(artifact))


if __name__ == "__main__":
    main()
