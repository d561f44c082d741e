"""The Jensen gap over training, ``prior`` vs ``center``, from the runs' MLflow histories.

    python jobs/pretrain.py run.name=gap-prior                          # objective.mode=prior (default)
    python jobs/pretrain.py run.name=gap-center objective.mode=center
    python benchmarks/jensen_gap.py gap-prior gap-center

docs/theory.md §4: per cluster, Delta_k = log pi_k - log G_k >= 0 (arithmetic vs geometric mean of
the raw teacher's q_ik over the global batch); centering is exact when Delta is the same for
every cluster, so the spread over clusters is what separates ``center`` from ``prior``. Each
run logs ``jensen_gap_mean`` and ``jensen_gap_std`` (over clusters) at every logged step; this
plots mean +- std against the epoch, writes ``docs/benchmarks/jensen_gap.{png,json}`` and
logs both to an MLflow run (experiment ``rayssl-benchmarks``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.tracking import default_uri  # noqa: E402

OUT = ROOT / "docs/benchmarks/jensen_gap.json"


def history(client, run_name: str, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{run_name}'") if exp else []
    if not runs:
        sys.exit(f"{run_name}: no such run in experiment {experiment!r} of {client.tracking_uri}")
    run = runs[0]
    series = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                          key=lambda m: m.step)]
              for key in ("jensen_gap_mean", "jensen_gap_std", "epoch")}
    epochs = dict(series["epoch"])
    return {"run": run_name, "run_id": run.info.run_id, "mode": run.data.params.get("objective.mode"),
            "epoch": [epochs[s] for s, _ in series["jensen_gap_mean"]],
            "mean": [v for _, v in series["jensen_gap_mean"]], "std": [v for _, v in series["jensen_gap_std"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="MLflow run names (tracking.run_name / run.name)")
    p.add_argument("--experiment", default="rayssl")
    p.add_argument("--tracking-uri", default=None, help="default: rayssl's default store")
    args = p.parse_args()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri or default_uri())
    series = [history(client, name, args.experiment) for name in args.runs]
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in series:
        lo = [m - d for m, d in zip(s["mean"], s["std"])]
        hi = [m + d for m, d in zip(s["mean"], s["std"])]
        ax.plot(s["epoch"], s["mean"], label=f"{s['mode']} ({s['run']})")
        ax.fill_between(s["epoch"], lo, hi, alpha=0.25)
    ax.set(xlabel="epoch", ylabel="Jensen gap log pi_k - log G_k (nats)",
           title="Jensen gap over clusters: mean +- std across clusters")
    ax.legend()
    fig.tight_layout()
    png = OUT.with_suffix(".png")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print("| run | mode | gap mean: first -> last | gap std over clusters: first -> last |\n|---|---|---|---|")
    for s in series:
        print(f"| {s['run']} | {s['mode']} | {s['mean'][0]:.2f} -> {s['mean'][-1]:.2f} | "
              f"{s['std'][0]:.2f} -> {s['std'][-1]:.2f} |")
    OUT.write_text(json.dumps({"series": series, "date": time.strftime("%Y-%m-%d")}, indent=1))
    from train_ratio import log_mlflow

    log_mlflow("jensen_gap", {f"{s['mode']}_final_gap_std": s["std"][-1] for s in series}, OUT, png)


if __name__ == "__main__":
    main()
