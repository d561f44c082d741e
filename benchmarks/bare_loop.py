"""The control for epoch_boundary.py: rayssl's training loop without Ray, Ray Data or MLflow.

    python benchmarks/bare_loop.py                       # 2 processes, 2,400 steps: about a default run's 2,340
    python benchmarks/bare_loop.py --steps 200 train.precision=fp32

Two processes in a gloo group (the default run's 2 workers, 1 torch thread each) run ``TrainRun``
on 30,720 PNG-encoded Fashion-MNIST images held in memory, decoded and cropped a few
batches ahead as in a run, with the default recipe (configs/fashion_mnist.yaml plus overrides).
Its windows' spread (slowest / median) is what this machine gives a loop with no data pipeline
at all; a rayssl run's ratio below it is rayssl's or Ray's, a ratio near it is the machine's.
Prints the windows as they come and appends one JSON line to ``--out`` (epoch_boundary.py's fields).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.epoch_boundary import windows_report  # noqa: E402
from rayssl.config import load_config  # noqa: E402
from rayssl.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from rayssl.data.meta import DataMeta  # noqa: E402
from rayssl.train.run import TrainRun  # noqa: E402
from rayssl.train.worker import Worker  # noqa: E402

IMAGES, STEPS_PER_EPOCH = 30720, 120  # 120 steps of 2 x 128 images use every image once


def worker(rank: int, world: int, store: str, args: argparse.Namespace, speeds: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    x, _ = load_fashion_mnist(args.fashion_mnist, "train")
    encoded = []
    for image in x[:IMAGES]:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    encoded = np.array(encoded, dtype=object)
    epochs = -(-args.steps // STEPS_PER_EPOCH)
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [
        f"scaling.num_workers={world}", f"train.epochs={epochs}", "train.time_budget=null", "train.checkpoint_every=1000000",
        *args.overrides])
    meta = DataMeta(num_train=IMAGES, num_eval=0, channels=1, image_size=28, classes=tuple("0123456789"),
                    mean=(0.286,), std=(0.353,))

    def batches(seed: int, rows: int) -> list[dict]:  # this rank's half of the images, a fresh order per pass
        order = np.random.default_rng(seed).permutation(IMAGES)[rank::world]
        return [{"image": encoded[order[i:i + rows]]} for i in range(0, len(order) - rows + 1, rows)]

    started = time.time()

    def progress(line: str, p) -> None:
        speeds[p.step] = p.images_per_second
        print(f"{time.time() - started:7.1f} s  step {p.step}/{epochs * STEPS_PER_EPOCH}  "
              f"{p.images_per_second:.0f} img/s", flush=True)

    run = Worker(batches, rank=rank, world=world, prepare_model=torch.nn.parallel.DistributedDataParallel,
                 say=lambda line: None, progress=progress if rank == 0 else (lambda line, p: None))
    TrainRun(cfg, meta, STEPS_PER_EPOCH, run).run()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2340, help="steps to train (rounded up to whole 120-step epochs)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/epoch_boundary.jsonl")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, as jobs/pretrain.py takes them")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        speeds = manager.dict()
        mp.spawn(worker, args=(args.workers, os.path.join(tmp, "store"), args, speeds), nprocs=args.workers)
        report = windows_report(f"bare-loop-{time.strftime('%m%d-%H%M')}", dict(speeds), STEPS_PER_EPOCH)
    print(json.dumps(report, indent=1))
    with args.out.open("a") as f:
        f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
