"""Calibrate the collapse alarm (``rayssl.monitor``) on the metric histories of finished runs.

    python benchmarks/alarm_calibration.py                          # ~/rayssl_results/mlflow.db
    python benchmarks/alarm_calibration.py --store a.db --store b.db --patience 10

Reads every run of the MLflow SQLite store(s) that logged ``norm/effective_clusters`` (read-only,
with sqlite3) and prints, per run: ``objective.mode``, K, steps per epoch (from the ``epoch``
metric), the first logged value and the minimum of the two candidate statistics (effective
clusters, and I(X;K) / log K), and when the alarm of ``rayssl.monitor`` with the given
thresholds trips (step and epoch, or ``-``). The alarm is replayed with the real
``CollapseAlarm``, so the table calibrates the code, not a copy of it.

For a rule "statistic below t for ``patience`` consecutive logged steps" two numbers decide t:
- a healthy run (any mode but ``none``) stays silent iff t <= its *floor*: the lowest, over every
  window of ``patience`` consecutive logged steps, of the window's highest value;
- a ``none`` run trips within its first epoch iff t > its *first-epoch ceiling*: the same
  minimum over the windows that end within the first epoch.
A rule separates the modes when the best ``none`` ceiling is below the worst healthy floor; the
ratio of the two is its margin.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.config import MonitorConfig  # noqa: E402
from rayssl.monitor import CollapseAlarm  # noqa: E402

METRICS = ("norm/effective_clusters", "norm/mutual_information", "norm/marginal_entropy", "epoch")


def read_runs(store: Path) -> list[dict]:
    """``{name, mode, K, history}`` of every run in ``store`` with the diagnostics; ``history`` is
    one dict of ``METRICS`` per logged step, in step order."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    runs = []
    for run_id, name in db.execute("SELECT run_uuid, name FROM runs ORDER BY start_time"):
        params = dict(db.execute("SELECT key, value FROM params WHERE run_uuid = ? AND key IN "
                                 "('objective.mode', 'objective.num_clusters')", (run_id,)))
        rows = db.execute(f"SELECT step, key, value FROM metrics WHERE run_uuid = ? AND key IN "
                          f"({', '.join('?' * len(METRICS))})", (run_id, *METRICS)).fetchall()
        steps: dict[int, dict] = {}
        for step, key, value in rows:
            steps.setdefault(step, {"step": step})[key] = value
        history = [steps[s] for s in sorted(steps) if "norm/effective_clusters" in steps[s] and "epoch" in steps[s]]
        if history and "objective.mode" in params:
            runs.append({"name": name, "store": store.name, "mode": params["objective.mode"],
                         "K": int(params["objective.num_clusters"]), "history": history})
    db.close()
    return runs


def floor(values: list[float], patience: int) -> float:
    """The lowest window maximum over all windows of ``patience`` consecutive values (inf if
    there are fewer values than that: no window, the rule cannot trip)."""
    return min((max(values[i:i + patience]) for i in range(len(values) - patience + 1)), default=math.inf)


def summarise(run: dict, monitor: MonitorConfig) -> dict:
    """The table row of one run: candidate statistics, window floors, when the alarm trips."""
    history, log_k = run["history"], math.log(run["K"])
    steps_per_epoch = round(history[-1]["step"] / history[-1]["epoch"])
    first_epoch = [m for m in history if m["step"] <= steps_per_epoch]
    eff = [m["norm/effective_clusters"] for m in history]
    ratio = [m["norm/mutual_information"] / log_k for m in history]
    alarm, tripped = CollapseAlarm.of(monitor), None
    for m in history:
        if alarm.observe(m["step"], m) and tripped is None:
            tripped = m
    return {**run, "steps_per_epoch": steps_per_epoch, "logged": len(history),
            "eff_first": eff[0], "eff_min": min(eff), "ratio_first": ratio[0], "ratio_min": min(ratio),
            "i_min": min(m["norm/mutual_information"] for m in history),
            "eff_floor": floor(eff, monitor.patience), "ratio_floor": floor(ratio, monitor.patience),
            "eff_ceiling": floor(eff[:len(first_epoch)], monitor.patience),
            "ratio_ceiling": floor(ratio[:len(first_epoch)], monitor.patience),
            "tripped": tripped}


def margins(rows: list[dict], stat: str) -> tuple[dict, dict]:
    """(the healthy row with the lowest floor, the ``none`` row with the highest first-epoch ceiling)."""
    healthy = min((r for r in rows if r["mode"] != "none"), key=lambda r: r[f"{stat}_floor"])
    collapsed = max((r for r in rows if r["mode"] == "none"), key=lambda r: r[f"{stat}_ceiling"])
    return healthy, collapsed


def right(row: dict) -> bool:
    """A ``none`` run must trip within its first epoch; any other run must never trip."""
    trip = row["tripped"]
    if row["mode"] == "none":
        return trip is not None and trip["step"] <= row["steps_per_epoch"]
    return trip is None


def main() -> int:
    defaults = MonitorConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", action="append", type=Path,
                        help="MLflow SQLite file (repeatable; default ~/rayssl_results/mlflow.db)")
    parser.add_argument("--min-effective-clusters", type=float, default=defaults.min_effective_clusters)
    parser.add_argument("--min-mutual-information", type=float, default=defaults.min_mutual_information)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    args = parser.parse_args()
    monitor = MonitorConfig(min_effective_clusters=args.min_effective_clusters,
                            min_mutual_information=args.min_mutual_information, patience=args.patience)
    stores = args.store or [Path("~/rayssl_results/mlflow.db").expanduser()]
    rows = [summarise(run, monitor) for store in stores for run in read_runs(store)]
    rows.sort(key=lambda r: (r["mode"] != "none", r["mode"], r["K"], r["name"]))

    print(f"rule: norm/effective_clusters < {monitor.min_effective_clusters:g} or norm/mutual_information < "
          f"{monitor.min_mutual_information:g} nats, for {monitor.patience} consecutive logged steps\n")
    print("| run | mode | K | steps/epoch | logged | eff. clusters first / min / floor / epoch-1 ceiling | "
          "I(X;K)/log K first / min / floor / epoch-1 ceiling | I(X;K) min | alarm trips at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        trip = r["tripped"]
        when = f"step {trip['step']} (epoch {trip['epoch']:.2f})" if trip else "-"
        print(f"| {r['name']} | {r['mode']} | {r['K']} | {r['steps_per_epoch']} | {r['logged']} | "
              f"{r['eff_first']:.1f} / {r['eff_min']:.2f} / {r['eff_floor']:.2f} / {r['eff_ceiling']:.2f} | "
              f"{r['ratio_first']:.3f} / {r['ratio_min']:.3f} / {r['ratio_floor']:.3f} / {r['ratio_ceiling']:.3f} | "
              f"{r['i_min']:.3f} | {when} |")
    if not any(r["mode"] == "none" for r in rows) or all(r["mode"] == "none" for r in rows):
        return 0
    print(f"\nmargins at patience {monitor.patience} (a threshold t separates when ceiling < t <= floor):")
    for stat, title in (("eff", "effective clusters"), ("ratio", "I(X;K) / log K")):
        healthy, collapsed = margins(rows, stat)
        low, high = collapsed[f"{stat}_ceiling"], healthy[f"{stat}_floor"]
        print(f"  {title}: best none first-epoch ceiling {low:.3f} ({collapsed['name']}), worst healthy floor "
              f"{high:.3f} ({healthy['name']}, {healthy['mode']}): ratio {high / low:.2f}")
    wrong = [r["name"] for r in rows if not right(r)]
    print("\nrule as configured: " + ("WRONG on " + ", ".join(wrong) if wrong else
                                      "every none run trips within its first epoch, no other run trips"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
