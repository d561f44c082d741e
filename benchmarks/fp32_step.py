"""Where one training step's time goes, per precision and memory format, without Ray ([1/6]).

    python benchmarks/fp32_step.py                       # fp32 and bf16, channels-last and not, 1 thread
    python benchmarks/fp32_step.py --threads 2 --batch 256 --profile

One process runs the default recipe's step (configs/fashion_mnist.yaml: convnet4, prior, K=256,
two 28-px global crops) on random uint8 Fashion-MNIST-sized images: the crops (``MultiCrop``,
as a worker makes them with data.decode_on=worker, decoding excluded), then the Stepper's
forward, backward, optimizer and EMA. Each arm times ``--steps`` steps after ``--warmup``;
``--profile`` prints torch.profiler's top operators of the fp32 channels-last arm. The CPU's
bf16 flags are printed beside the figures (docs/benchmarks.md names the CPU kind beside each).
Appends one JSON line per arm to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import load_config  # noqa: E402
from rayssl.models import build_encoder, make_teacher  # noqa: E402
from rayssl.objective import ClusterObjective  # noqa: E402
from rayssl.schedules import build_schedules  # noqa: E402
from rayssl.train.step import Stepper, build_optimizer, cpu_has_bf16  # noqa: E402
from rayssl.transforms import MultiCrop  # noqa: E402


def arm(cfg, batch: int, bf16: bool, channels_last: bool, steps: int, warmup: int, profile: bool) -> dict:
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters).to(memory_format=fmt)
    teacher = make_teacher(student)
    objective = ClusterObjective(cfg.objective)
    stepper = Stepper(student, teacher, objective, build_optimizer(student, cfg.optim),
                      build_schedules(cfg, 234, batch), cfg, 234, torch.device("cpu"), bf16)
    crops = MultiCrop(cfg.augment, 1, (0.286,), (0.353,))
    images = torch.randint(0, 256, (batch, 1, 32, 32), dtype=torch.uint8)
    crop_s = step_s = 0.0

    def one(step: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        views = crops(images)
        if not channels_last:
            views = [v.contiguous() for v in views]
        t1 = time.perf_counter()
        stepper.micro_batch(views, step, True)
        stepper.finish(step)
        return t1 - t0, time.perf_counter() - t1

    for step in range(warmup):
        one(step)
    for step in range(warmup, warmup + steps):
        c, s = one(step)
        crop_s, step_s = crop_s + c, step_s + s
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for step in range(warmup + steps, warmup + steps + 5):
                one(step)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
    return {"precision": "bf16" if bf16 else "fp32", "channels_last": channels_last,
            "crop_ms": round(1000 * crop_s / steps, 1), "step_ms": round(1000 * step_s / steps, 1),
            "images_per_second": round(batch * steps / (crop_s + step_s), 1)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a default run's worker has 1)")
    p.add_argument("--batch", type=int, default=128, help="images per step (a default run's worker: 128)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="torch.profiler's top operators, fp32 channels-last")
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks/fp32_step.jsonl"))
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", args.overrides)
    cpu = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_model(), "native_bf16": cpu_has_bf16(),
           "threads": args.threads, "batch": args.batch, "overrides": args.overrides}
    arms = [(False, True), (False, False)] + ([(True, True), (True, False)] if cpu["native_bf16"] else [])
    with open(args.out, "a") as f:
        for bf16, channels_last in arms:
            result = {**cpu, **arm(cfg, args.batch, bf16, channels_last, args.steps, args.warmup,
                                   args.profile and not bf16 and channels_last)}
            print(json.dumps(result), flush=True)
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
