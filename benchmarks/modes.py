"""Teacher normalisations compared at an equal budget: one config key varied, several seeds.

    python benchmarks/modes.py                                  # objective.mode x 3 seeds (item 3)
    python benchmarks/modes.py --name scope --vary objective.scope=global,local --seeds 0,1,2 \\
        scaling.num_workers=4 train.batch_size=16 train.steps_per_epoch=234     # global vs local prior

Each run is the embedded default (configs/fashion_mnist.yaml) plus the overrides given
(default: ``train.epochs=1``), trained by ``rayssl.train.launch.pretrain`` in this process, then
evaluated by ``rayssl.eval.evaluate`` on all 60k/10k images: weighted 20-NN, linear probe, NMI
and ARI of the teacher's argmax clusters, I(X;K) and effective clusters over the 10k test
images; the Jensen gap (mean and spread over clusters) is the run's last logged value. Runs
land in MLflow experiment ``rayssl-<name>`` of the default store; the table (mean +- std over seeds) is printed,
written to ``docs/benchmarks/<name>.{json,png}`` and logged to experiment ``rayssl-benchmarks``.
A run already in the JSON is not run again, so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import load_config  # noqa: E402
from rayssl.tracking import default_uri  # noqa: E402

COLUMNS = {  # result key -> column title
    "knn": "k-NN (20-NN)", "linear": "linear probe", "nmi": "NMI", "ari": "ARI",
    "mutual_information": "I(X;K)", "effective_clusters": "effective clusters",
    "jensen_gap_mean": "Jensen gap mean", "jensen_gap_std": "Jensen gap std",
}
BUDGET = ["train.epochs=1", "train.time_budget=null", "eval.baselines=false", "tracking.log_model=false"]


def one_run(name: str, key: str, value: str, seed: int, overrides: list[str], work: Path) -> dict:
    """Train and evaluate one (value, seed); the row of the table."""
    from rayssl.eval.evaluate import evaluate
    from rayssl.train.launch import pretrain

    run = f"bench-{name}-{value}-s{seed}-{time.strftime('%H%M%S')}"
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml",
                      [*overrides, f"{key}={value}", f"train.seed={seed}", f"run.name={run}",
                       f"run.storage_path={work}", f"tracking.uri={default_uri()}",
                       f"tracking.experiment=rayssl-{name}"])
    started = time.time()
    out = pretrain(cfg)
    wall_seconds = time.time() - started  # the whole pretrain call: Ray Train start-up included
    ev = evaluate(out["run_path"], None, work / f"eval-{run}", ks=(20,))
    last = out["history"][-1]
    return {"run": run, "value": value, "seed": seed, "steps": last["step"], "stopped": out.get("stopped"),
            "wall_seconds": wall_seconds, "knn": ev["knn/top1_k20"], "linear": ev["linear/top1"],
            "nmi": ev["cluster/nmi"], "ari": ev["cluster/ari"],
            "mutual_information": ev["cluster/mutual_information"],
            "effective_clusters": ev["cluster/effective_clusters"],
            "jensen_gap_mean": last["jensen_gap_mean"], "jensen_gap_std": last["jensen_gap_std"]}


def summary(rows: list[dict], values: list[str]) -> list[dict]:
    """Mean and std over seeds of each column, per value."""
    out = []
    for value in values:
        group = [r for r in rows if r["value"] == value]
        if group:
            out.append({"value": value, "seeds": len(group), **{
                col: (statistics.mean(r[col] for r in group),
                      statistics.stdev(r[col] for r in group) if len(group) > 1 else 0.0) for col in COLUMNS}})
    return out


def table(key: str, summ: list[dict]) -> str:
    lines = [f"| {key} | seeds | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for s in summ:
        cells = []
        for col in COLUMNS:
            m, d = s[col]
            pct = col in ("knn", "linear")
            cells.append(f"{100 * m:.2f} ± {100 * d:.2f} %" if pct else f"{m:.3f} ± {d:.3f}")
        lines.append(f"| {s['value']} | {s['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(key: str, rows: list[dict], values: list[str], png: Path) -> None:
    """One panel per metric, one dot per seed."""
    cols = ["knn", "linear", "nmi", "mutual_information", "effective_clusters", "jensen_gap_std"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3 * len(cols), 3.2))
    for ax, col in zip(axes, cols):
        for i, value in enumerate(values):
            ys = [r[col] for r in rows if r["value"] == value]
            ax.scatter([i] * len(ys), ys, s=18)
        ax.set_xticks(range(len(values)), values, rotation=30)
        ax.set_title(COLUMNS[col], fontsize=9)
    fig.suptitle(f"{key}: one dot per seed")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="modes", help="names the JSON/PNG, the runs and their MLflow experiment")
    p.add_argument("--vary", default="objective.mode=none,center,prior,sinkhorn", help="KEY=v1,v2,...")
    p.add_argument("--seeds", default="0,1,2", help="train.seed values; 3 give a mean and a spread")
    p.add_argument("--work", default=None, help="run folders and evaluations (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides of every run (default: {' '.join(BUDGET)})")
    args = p.parse_args()
    key, _, raw = args.vary.partition("=")
    values, seeds = raw.split(","), [int(s) for s in args.seeds.split(",")]
    overrides = args.overrides or BUDGET
    out = ROOT / f"docs/benchmarks/{args.name}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = [r for r in old.get("runs", []) if old.get("overrides") == overrides and old.get("vary") == key]
    done = {(r["value"], r["seed"]) for r in rows}
    work = Path(args.work or tempfile.mkdtemp(prefix=f"rayssl-{args.name}-"))
    for seed in seeds:  # seed-major: a partial grid already holds every value
        for value in values:
            if (value, seed) not in done:
                rows.append(one_run(args.name, key, value, seed, overrides, work))
                print(f"[modes] {rows[-1]}", flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"vary": key, "overrides": overrides, "runs": rows}, indent=1))
    summ = summary(rows, values)
    print(table(key, summ))
    png = out.with_suffix(".png")
    plot(key, rows, values, png)
    out.write_text(json.dumps({"vary": key, "overrides": overrides, "runs": rows, "summary": summ,
                               "date": time.strftime("%Y-%m-%d")}, indent=1))
    from train_ratio import log_mlflow

    log_mlflow(args.name, {f"{s['value']}_{col}": s[col][0] for s in summ for col in COLUMNS}, out, png)


if __name__ == "__main__":
    main()
