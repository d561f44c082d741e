"""Cost of the teacher normalisation (``objective.mode``) as a fraction of the training step.

    python benchmarks/objective_overhead.py                   # K in 1024 65536, 2 gloo ranks x 128
    python benchmarks/objective_overhead.py --clusters 4096 --world 1

Two processes (gloo on CPU, one thread each) run the rayssl ``Stepper`` on in-memory random
views, global batch ``--world`` x ``--batch``. For each K and mode it times (a) the whole step
and (b) the objective alone, ``ClusterObjective.targets`` + ``update_state`` on the step's
teacher logits, the all-reduces of the global prior / centre included. The fraction is
(b) / (a) of the same mode; ``none`` is the floor (a softmax). Medians over ``--repeats``.
Prints a table, writes ``docs/benchmarks/objective_overhead.json``, logs an MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import load_config  # noqa: E402
from rayssl.models import build_encoder, make_teacher  # noqa: E402
from rayssl.objective import ClusterObjective  # noqa: E402
from rayssl.schedules import build_schedules  # noqa: E402
from rayssl.train.step import Stepper, build_optimizer  # noqa: E402

OUT = ROOT / "docs/benchmarks/objective_overhead.json"
MODES = ("none", "center", "prior", "sinkhorn")


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up, ranks in step."""
    fn()
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for k in args.clusters:
        for mode in MODES:
            cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [
                f"objective.mode={mode}", f"objective.num_clusters={k}", f"train.batch_size={args.batch}",
                "objective.prior_momentum=0.9"])
            torch.manual_seed(0)
            student = build_encoder(cfg.model, 1, 28, k).to(memory_format=torch.channels_last)
            if world > 1:
                student = torch.nn.parallel.DistributedDataParallel(student)
            objective = ClusterObjective(cfg.objective)
            stepper = Stepper(student, make_teacher(student), objective, build_optimizer(student, cfg.optim),
                              build_schedules(cfg, 100, args.batch * world), cfg, 100,
                              torch.device("cpu"), False)
            views = [torch.randn(args.batch, 1, 28, 28), torch.randn(args.batch, 1, 28, 28),
                     *[torch.randn(args.batch, 1, 14, 14) for _ in range(cfg.augment.local_crops)]]

            def step() -> None:
                stepper.micro_batch(views, 10, True)
                stepper.finish(10)

            step_s = timed(step, args.repeats)
            logits = stepper.last_outputs[1]

            def normalise() -> None:
                objective.update_state([objective.targets(logits, 0.04).stat])

            objective_s = timed(normalise, args.repeats * 5)
            rows.append({"num_clusters": k, "mode": mode, "step_ms": 1000 * step_s,
                         "objective_ms": 1000 * objective_s, "fraction": objective_s / step_s})
    if rank == 0:
        queue.put(rows)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, nargs="+", default=[1024, 65536])
    p.add_argument("--world", type=int, default=2, help="gloo processes (the all-reduce needs 2 or more)")
    p.add_argument("--batch", type=int, default=128, help="images per process")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(worker, args=(args.world, port, args, queue), nprocs=args.world, start_method="spawn")
    rows = queue.get()
    print(f"\nglobal batch {args.world * args.batch}, {args.world} gloo ranks x 1 thread, median of {args.repeats}\n"
          "| K | mode | step ms | objective ms | objective / step |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_clusters']} | {r['mode']} | {r['step_ms']:.0f} | {r['objective_ms']:.2f} | "
              f"{100 * r['fraction']:.2f} % |")
    result = {"rows": rows, "world": args.world, "batch_per_rank": args.batch, "repeats": args.repeats,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    from train_ratio import log_mlflow

    log_mlflow("objective_overhead", {f"{r['mode']}_k{r['num_clusters']}_fraction": r["fraction"] for r in rows},
               OUT)


if __name__ == "__main__":
    main()
