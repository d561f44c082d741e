"""Teacher k-NN of a recipe against the wall clock: the [8/8] quality goal.

    python benchmarks/quality.py                                       # configs/fashion_mnist_30min.yaml
    python benchmarks/quality.py --config configs/fashion_mnist.yaml   # the 10-minute default

One ``rayssl.train.launch.pretrain`` run, timed from before Ray starts to its last k-NN
(weighted 20-NN, 60k bank / 10k test, with the raw-pixel and random-init baselines of the
same run). Prints a table, writes ``docs/benchmarks/quality-<config>.json`` and logs an
MLflow run (experiment ``rayssl-benchmarks``); the training run itself is in ``rayssl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import load_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/fashion_mnist_30min.yaml"))
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args()
    name = Path(args.config).stem
    cfg = load_config(args.config, [f"run.name=quality-{name}-{time.strftime('%m%d-%H%M')}", *args.overrides])
    from rayssl.train.launch import pretrain

    started = time.time()
    out = pretrain(cfg)
    wall = time.time() - started
    result = {"config": name, "overrides": args.overrides, "run": cfg.run.name, "wall_seconds": wall,
              "train_seconds": out["train_seconds"], "steps": out["history"][-1]["step"],
              "epochs": out["history"][-1]["epoch"], **{k: v for k, v in out.items() if k.startswith("knn/")},
              "mutual_information": out["history"][-1]["norm/mutual_information"],
              "effective_clusters": out["history"][-1]["norm/effective_clusters"],
              "date": time.strftime("%Y-%m-%d")}
    print(f"\n| {name} | value |\n|---|---|\n| wall clock | {wall / 60:.1f} min |\n"
          f"| epochs ({result['steps']} steps) | {result['epochs']:.2f} |")
    for key in sorted(k for k in result if k.startswith("knn/")):
        print(f"| {key} | {100 * result[key]:.2f} % |")
    path = ROOT / f"docs/benchmarks/quality-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    from train_ratio import log_mlflow

    log_mlflow(f"quality-{name}", result, path)


if __name__ == "__main__":
    main()
