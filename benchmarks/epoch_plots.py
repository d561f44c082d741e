"""CPU time of one epoch's plots, drawn and logged to a local MLflow store ([5/5]).

    python benchmarks/epoch_plots.py                 # K=256, the default run's clusters
    python benchmarks/epoch_plots.py --clusters 65536

Rank 0 draws the cluster-prior histogram and the cluster-usage bars at every epoch boundary,
in a thread beside training (``rayssl.tracking.RunLogger.epoch_plots``). On a 2-core machine
that thread's CPU time is taken from the training step of rank 0, which every rank then waits
for at the next all-reduce, so it shows as a slower window at each boundary.
Prints the CPU seconds of each repeat (the first one imports and warms matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.tracking import MlflowRun, RunLogger  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clusters", type=int, default=256, help="objective.num_clusters")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    prior = rng.dirichlet(np.full(args.clusters, 0.3))
    assigned = rng.multinomial(60000, prior)
    with tempfile.TemporaryDirectory() as tmp:
        import mlflow

        uri = f"sqlite:///{tmp}/mlflow.db"
        client = mlflow.MlflowClient(uri)
        experiment = client.create_experiment("epoch-plots", artifact_location=f"{tmp}/artifacts")
        run = RunLogger(MlflowRun(uri=uri, run_id=client.create_run(experiment).info.run_id))
        for epoch in range(1, args.repeats + 1):
            started = time.process_time()
            run._epoch_plots(epoch, prior, assigned)
            print(f"epoch {epoch}: {time.process_time() - started:.3f} CPU-s (K={args.clusters})")
        run.end()


if __name__ == "__main__":
    main()
