"""Time the pieces of one training step on this machine (no Ray).

    python benchmarks/step_speed.py [--threads 1] [dotted overrides]

Prints seconds per micro-batch for the multi-crop augmentation and for a full student/teacher
step (teacher forward, student forward/backward, AdamW) with contiguous and channels_last
tensors. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import ObjectiveConfig, load_config  # noqa: E402
from rayssl.models import build_encoder, make_teacher  # noqa: E402
from rayssl.objective import ClusterObjective  # noqa: E402
from rayssl.transforms import MultiCrop  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitive creation)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/fashion_mnist.yaml", args.overrides)
    b = cfg.train.batch_size
    images = torch.randint(0, 256, (b, 1, 28, 28), dtype=torch.uint8)
    crops = MultiCrop(cfg.augment, 1, (0.286,), (0.353,))
    print(f"multi-crop ({len(crops.views)} views of {b}): {timed(lambda: crops(images), args.repeats):.3f} s")
    views = crops(images)
    for layout in (torch.contiguous_format, torch.channels_last):
        student = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters).to(memory_format=layout)
        teacher = make_teacher(student)
        objective = ClusterObjective(ObjectiveConfig(num_clusters=cfg.objective.num_clusters))
        opt = torch.optim.AdamW(student.parameters())
        v = [x.contiguous(memory_format=layout) for x in views]

        def step() -> None:
            with torch.no_grad():
                t = teacher(v[:2])
            objective(student(v), t, 0.04)[0].backward()
            opt.step()
            opt.zero_grad()

        print(f"train step {layout}: {timed(step, args.repeats):.3f} s")


if __name__ == "__main__":
    main()
