"""Throughput at epoch boundaries: the slowest logged window against the median ([5/5]).

    python benchmarks/epoch_boundary.py train.epochs=4            # a fresh default run, then its windows
    python benchmarks/epoch_boundary.py --run-id ID --tracking-uri sqlite:///path/mlflow.db   # a logged run

Each logged step's ``images_per_second`` covers the window since the previous logged step.
Reports the median, the slowest window and their ratio (target >= 0.8), and the windows that
hold an epoch boundary against the others. When every epoch started a new Ray Data execution,
the windows after a boundary slowed down (0.51-0.60 of the median on 2 cores, docs/benchmarks.md);
the stream now runs every epoch in one execution.
Appends one JSON line per run to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def windows_report(name: str, speeds: dict[int, float], steps_per_epoch: int) -> dict:
    """Median, slowest window, their ratio; boundary windows (an epoch ends inside them) apart.
    Only full windows count: a run's last window may hold a few steps (2 of 20), too few to time."""
    steps = sorted(speeds)
    starts = dict(zip(steps, [0] + steps[:-1]))
    full = statistics.mode(s - starts[s] for s in steps)
    steps = [s for s in steps if s - starts[s] == full]
    speeds = {s: speeds[s] for s in steps}
    # a boundary window holds the first step of an epoch after the first (step k + 1, k a multiple of it)
    boundary = {s for s in steps if starts[s] > 0 and (s - 1) // steps_per_epoch > (starts[s] - 1) // steps_per_epoch}
    median = statistics.median(speeds.values())
    slowest = min(steps, key=speeds.get)
    inner = [speeds[s] for s in steps if s not in boundary]
    return {"name": name, "windows": len(steps), "steps_per_epoch": steps_per_epoch,
            "median_images_per_second": round(median, 1), "slowest_step": slowest,
            "slowest_images_per_second": round(speeds[slowest], 1),
            "min_over_median": round(speeds[slowest] / median, 3),
            "boundary_windows_median": round(statistics.median(speeds[s] for s in boundary), 1) if boundary else None,
            "other_windows_median": round(statistics.median(inner), 1),
            "first_window_over_median": round(speeds[steps[0]] / median, 3)}


def from_mlflow(uri: str, run_id: str) -> tuple[dict[int, float], int, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    speeds = {m.step: m.value for m in client.get_metric_history(run_id, "images_per_second")}
    epochs = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    step = max(epochs)
    return speeds, round(step / epochs[step]), client.get_run(run_id).info.run_name


def fresh_run(overrides: list[str]) -> tuple[dict[int, float], int, str]:
    from rayssl.config import load_config
    from rayssl.train.launch import pretrain

    name = f"epoch-boundary-{time.strftime('%m%d-%H%M')}"
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [f"run.name={name}", *overrides])
    results = pretrain(cfg)
    history = results["history"]
    speeds = {m["step"]: m["images_per_second"] for m in history}
    last = history[-1]
    return speeds, round(last["step"] / last["epoch"]), name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", help="analyse this logged MLflow run instead of training one")
    p.add_argument("--tracking-uri", default=f"sqlite:///{Path('~/rayssl_results/mlflow.db').expanduser()}")
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks/epoch_boundary.jsonl"))
    p.add_argument("overrides", nargs="*", help="config overrides of the fresh run, e.g. train.epochs=4")
    args = p.parse_args()
    speeds, steps_per_epoch, name = (from_mlflow(args.tracking_uri, args.run_id) if args.run_id
                                     else fresh_run(args.overrides))
    report = windows_report(name, speeds, steps_per_epoch)
    print(json.dumps(report, indent=1))
    with open(args.out, "a") as f:
        f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
