"""Quick single-process probe of a pretraining recipe (no Ray): k-NN on a slice over time.

    python benchmarks/recipe_probe.py --minutes 4 objective.mode=prior model.width=32

Trains with the same Stepper, MultiCrop and schedules as the Ray job (one process, global
batch = train.batch_size) and prints weighted 20-NN accuracy of the teacher on a
10k-train / 2k-test slice at start and every --eval-every steps. For comparing recipes
quickly; the real number comes from jobs/pretrain.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import load_config  # noqa: E402
from rayssl.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from rayssl.knn import knn_accuracy  # noqa: E402
from rayssl.models import build_encoder, make_teacher  # noqa: E402
from rayssl.objective import ClusterObjective, ObjectiveSpec  # noqa: E402
from rayssl.schedules import build_schedules  # noqa: E402
from rayssl.train.step import Stepper, build_optimizer  # noqa: E402
from rayssl.transforms import MultiCrop  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="stop training after this long")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/fashion_mnist.yaml", args.overrides)
    x, _ = load_fashion_mnist(cfg.data.fashion_mnist_dir, "train")
    bank_x, bank_y = load_fashion_mnist(cfg.data.fashion_mnist_dir, "train", 10000)
    test_x, test_y = load_fashion_mnist(cfg.data.fashion_mnist_dir, "test", 2000)
    mean, std = (float(x.mean() / 255),), (float(x.std() / 255),)
    torch.manual_seed(cfg.train.seed)
    student = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters).to(memory_format=torch.channels_last)
    teacher = make_teacher(student)
    objective = ClusterObjective(ObjectiveSpec.from_mapping(cfg.objective.model_dump()))
    spe = len(x) // cfg.train.batch_size
    stepper = Stepper(student, teacher, objective, build_optimizer(student, cfg.optim),
                      build_schedules(cfg, spe, cfg.train.batch_size), cfg, spe, torch.device("cpu"), False)
    crops = MultiCrop(cfg.augment, 1, mean, std)
    images = torch.from_numpy(x.copy()).unsqueeze(1)

    def knn(batch_stats: bool = False) -> float:
        teacher.train(batch_stats)
        with torch.no_grad():
            f = lambda a: torch.cat([teacher.features(crops.eval_transform(torch.from_numpy(a[i:i + 1000]).unsqueeze(1), 28))
                                     for i in range(0, len(a), 1000)])
            return knn_accuracy(f(bank_x), torch.from_numpy(bank_y), f(test_x), torch.from_numpy(test_y), 10)

    print(f"step 0 knn {knn():.4f}", flush=True)
    start, step, total = time.time(), 0, len(stepper.schedules["lr"])
    while time.time() - start < args.minutes * 60 and step < total:
        idx = torch.randint(0, len(images), (cfg.train.batch_size,))
        student.train(), teacher.train()
        loss = stepper.micro_batch(crops(images[idx]), step, True)
        stepper.finish(step)
        step += 1
        if step % args.eval_every == 0:
            d = stepper.diagnostics()
            print(f"step {step} epoch {step / spe:.2f} loss {float(loss):.3f} I {d['norm/mutual_information']:.2f} "
                  f"knn {knn():.4f} batch-stat knn {knn(True):.4f} ({time.time() - start:.0f}s)", flush=True)
    print(f"final step {step} knn {knn():.4f} ({(time.time() - start):.0f}s, "
          f"{step * cfg.train.batch_size / (time.time() - start):.0f} img/s)")


if __name__ == "__main__":
    main()
