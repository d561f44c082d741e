"""Search rayssl hyperparameters with Ray Tune: each trial is a full pretraining run.

    python jobs/sweep.py                                            # default space on Fashion-MNIST
    python jobs/sweep.py --space configs/sweeps/temperatures_k.yaml sweep.num_samples=20
    python jobs/sweep.py --config configs/fashion_mnist.yaml --space my_space.yaml sweep.time_budget_s=3600
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/sweep.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

ADVICE = """
space file (YAML, three sections; every key is checked before any trial starts):
  sweep:   the sweep settings below (in the file without their sweep. prefix)
  fixed:   {dotted.key: value} for every trial, e.g. train.epochs: 2, data.train_limit: 20000
  space:   {dotted.key: {choice: [..]} | {grid: [..]} | {uniform: [lo, hi]} |
           {loguniform: [lo, hi]} | {randint: [lo, hi]} | {lograndint: [lo, hi]}}  (ints inclusive)

tuning advice:
  Start with the teacher temperature (loguniform 0.02-0.08) and K (lograndint 256-65536): they
  matter most and interact (a large K wants a lower temperature and a larger batch). Then the
  mode (prior vs center vs sinkhorn) at the best temperature; alpha and prior_momentum last.
  Short trials rank configs well enough: use `fixed` to cut epochs and data, then rerun the
  best.yaml at full length. Equal time instead of equal steps: fixed {train.time_budget: 5m}
  (with the train.epochs cap above it; a sweep's budget covers training, train.time_budget_scope:
  training, unless the space sets it) gives every trial the same training time, so a recipe that
  trains slower pays in steps; each trial times its own steps, so give trials that share CPUs a
  cluster where they run alone (max_concurrent_trials: 1 on a small machine). Equal steps: set
  train.time_budget: null (the default config is sized by time). ASHA compares trials at each
  online k-NN evaluation (sweep.evaluations per trial); without labels it ranks by
  norm/mutual_information, I(X;K) of the normalised teacher. A trial whose effective clusters stay
  below monitor.min_effective_clusters (or I(X;K) below monitor.min_mutual_information) for
  monitor.patience logged steps has collapsed and stops itself (marked "collapse" in trials.csv).
  Each trial reserves scaling.num_workers (its max) x scaling.cpus_per_worker CPUs (or GPUs); by
  default as many trials run at once as the cluster fits, so a small cluster never deadlocks.
  Rerunning with the same sweep.name resumes an interrupted sweep (Tune's restore).

outputs (in sweep.storage_path/NAME): trials.csv, best.yaml (ready to run:
  python jobs/pretrain.py --config .../best.yaml), Tune's state; MLflow: one parent run per
  sweep (tracking.experiment) with a child run per trial.
"""


def epilog() -> str:
    """The advice, then the sweep settings and the config keys, generated from their models' field
    descriptions."""
    from rayssl.config import help_text
    from rayssl.tune import SweepConfig

    return (ADVICE + "\nsweep settings (the space file's sweep section, or sweep.key=value overrides):\n"
            + help_text(SweepConfig, "sweep.")
            + "\n\nconfig keys (key: type = default) for fixed, space and key=value overrides of the base "
            "config;\nthe defaults are the model's, the --config file sets some of them:\n\n" + help_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/fashion_mnist.yaml"),
                        help="base pretraining config (default: configs/fashion_mnist.yaml)")
    parser.add_argument("--space", default=str(ROOT / "configs/sweeps/temperatures_k.yaml"),
                        help="space file (default: configs/sweeps/temperatures_k.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides: sweep.* for the sweep, anything else for the base config")
    args = parser.parse_args(argv)

    from rayssl.tune import load_sweep, sweep

    try:
        settings, base, space = load_sweep(args.space, args.config, args.overrides)
        summary = sweep(base, settings, space)
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    table = summary["table"]
    print(f"\nsweep {summary['name']}: {summary['num_trials']} trials, {summary['stopped_early']} stopped early, "
          f"{summary['seconds'] / 60:.1f} min")
    print(table.to_string(index=False, float_format="{:.4g}".format))
    print(f"\nbest {summary['metric']} = {summary['best_value']:.4f}: {summary['best_params']}")
    print(f"trials: {summary['folder']}/trials.csv")
    print(f"best config: python jobs/pretrain.py --config {summary['folder']}/best.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
