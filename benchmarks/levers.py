"""Validation-split A/B probe of one pretraining recipe, without Ray (the [1/5] levers table).

    python benchmarks/levers.py --name base
    python benchmarks/levers.py --name jit08 augment.color_jitter=0.8

Honest protocol: training uses the first 50k Fashion-MNIST *train* images only; the k-NN bank
is those 50k and the queries are the held-out last 10k of train (the validation split). The
test split is never read. Trains one process (``--threads`` torch threads) with the same
Stepper, MultiCrop, objective and schedules as the Ray job, for the default run's number of
optimizer steps at its global batch (``--steps``, which every schedule spans; default, for a
config without ``train.time_budget``: ``train.epochs`` x 60k / global batch), then scores the
teacher, the raw pixels and the same network at random init under each feature protocol: as is, centred by the bank mean, and
(for networks) with BatchNorm statistics recomputed on clean images, so each row gets exactly
the same treatment. ``train.precision`` follows the job's rule (``auto``: bf16 on native-bf16 CPUs). Appends one JSON line per probe to ``--out``
(keys ``<row>``, ``<row>/centered``, ``<row>/bn``, ``<row>/bn/centered``; lines written before eval.centre
became eval.center spell the centered keys ``/centred``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import load_config  # noqa: E402
from rayssl.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from rayssl.eval.protocol import bank_mean, precise_bn  # noqa: E402
from rayssl.knn import knn_accuracy  # noqa: E402
from rayssl.models import build_encoder, make_teacher  # noqa: E402
from rayssl.objective import ClusterObjective  # noqa: E402
from rayssl.schedules import build_schedules  # noqa: E402
from rayssl.train.step import Stepper, build_optimizer, use_bf16  # noqa: E402
from rayssl.transforms import MultiCrop  # noqa: E402

TRAIN, FULL = 50_000, 60_000


def score(name: str, feats, bank_y, query_y, out: dict) -> None:
    """k-NN of one feature set under each protocol: as is, and centred by the bank mean."""
    bank, query = feats
    out[f"{name}"] = knn_accuracy(bank, bank_y, query, query_y, 10)
    mean = bank_mean(bank.float())
    out[f"{name}/centered"] = knn_accuracy(bank - mean, bank_y, query - mean, query_y, 10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--config", default=str(ROOT / "configs/fashion_mnist.yaml"))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks/levers.jsonl"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    x, y = load_fashion_mnist(cfg.data.fashion_mnist_dir, "train")
    images, labels = torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y)
    train = images[:TRAIN]
    mean, std = (float(train.float().mean() / 255),), (float(train.float().std() / 255),)
    torch.manual_seed(cfg.train.seed)
    batch = cfg.train.batch_size * cfg.scaling.max_workers
    spe = FULL // batch
    student = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters).to(memory_format=torch.channels_last)
    teacher = make_teacher(student)
    objective = ClusterObjective(cfg.objective)
    if cfg.train.time_budget and not args.steps:
        p.error(f"the config is sized by train.time_budget ({cfg.train.time_budget}): give --steps, or "
                "train.time_budget=null to train train.epochs")
    schedules = build_schedules(cfg, spe, batch, args.steps)  # every schedule spans the steps trained
    total = len(schedules["lr"])
    stepper = Stepper(student, teacher, objective, build_optimizer(student, cfg.optim),
                      schedules, cfg, spe, torch.device("cpu"), use_bf16(cfg.train.precision, torch.device("cpu")))
    crops = MultiCrop(cfg.augment, 1, mean, std)

    def features(backbone) -> tuple[torch.Tensor, torch.Tensor]:
        backbone.eval()
        with torch.no_grad():
            f = torch.cat([backbone(crops.eval_transform(images[i:i + 1000], 28)
                                          .contiguous(memory_format=torch.channels_last))
                           for i in range(0, FULL, 1000)])
        return f[:TRAIN], f[TRAIN:]

    def recalibrated(backbone):
        """A copy whose BatchNorm statistics are recomputed on 10k clean training images (precise BN)."""
        clean = (crops.eval_transform(train[i:i + 500], 28).contiguous(memory_format=torch.channels_last)
                 for i in range(0, 10_000, 500))
        return precise_bn(backbone, clean, lambda m, x: m(x))

    result: dict = {"name": args.name, "overrides": args.overrides, "steps": total, "global_batch": batch}
    bank_y, query_y = labels[:TRAIN], labels[TRAIN:]
    score("raw_pixels", (images[:TRAIN].flatten(1).float(), images[TRAIN:].flatten(1).float()), bank_y, query_y, result)
    score("random_init", features(teacher.backbone), bank_y, query_y, result)
    score("random_init/bn", features(recalibrated(teacher.backbone)), bank_y, query_y, result)
    start = time.time()
    for step in range(total):
        idx = torch.randint(0, TRAIN, (batch,))
        student.train(), teacher.train()
        stepper.micro_batch(crops(images[idx]), step, True)
        stepper.finish(step)
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{total} {time.time() - start:.0f}s", flush=True)
    result["train_seconds"] = round(time.time() - start, 1)
    result["images_per_second"] = round(total * batch / (time.time() - start), 1)
    result.update({k: round(v, 4) for k, v in stepper.diagnostics().items() if k.startswith("norm/")})
    score("teacher", features(teacher.backbone), bank_y, query_y, result)
    score("teacher/bn", features(recalibrated(teacher.backbone)), bank_y, query_y, result)
    score("student", features(student.backbone), bank_y, query_y, result)
    print(json.dumps(result), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
