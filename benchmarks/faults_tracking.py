"""The tracking rows of the faults table ([3/6], docs/benchmarks.md): a real job against a real
``mlflow server`` on loopback that is stopped mid-run.

    python benchmarks/faults_tracking.py              # both rows, ~5 min on 2 cores
    python benchmarks/faults_tracking.py --rows mid   # only the 40-s outage

Row ``mid``: the server stops once the run has logged 4 points and starts again 40 s later, on
the same port and store (the issue's repro). Row ``end``: it stops at the same point and stays
down until the job has exited; then it starts and ``jobs/sync_tracking.py`` replays the backlog
the job left in its run folder. Each row prints the job's outcome, the loss points MLflow holds
against the logged steps (lost, duplicated) and the seconds from the server's return to the
points' delivery. Nothing is kept: the server, its store and the runs live in a temporary folder.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mlflow_server import MlflowServer  # noqa: E402

JOB = ["data.train_limit=4096", "data.eval_limit=1024", "train.epochs=12", "train.log_every=2",
       "train.time_budget=null", "eval.baselines=false", "tracking.log_model=false"]
OUTAGE_S = 40.0


class Job:
    """``jobs/pretrain.py`` in a subprocess, its output lines stamped as they come."""

    def __init__(self, *overrides: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "jobs/pretrain.py"), *JOB, *overrides],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            for part in line.rstrip("\n").split("\r"):
                self.lines.append((time.time(), part))

    def wait(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc

    def said(self, text: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.lines if text in line]


def loss_steps(uri: str, experiment: str) -> tuple[str | None, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    if not runs:
        return None, []
    return runs[0].info.run_id, sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))


def wait_points(server: MlflowServer, name: str, job: Job, n: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while len(loss_steps(server.uri, name)[1]) < n:
        if job.proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the job logged fewer than {n} points ({job.proc.poll()=})")
        time.sleep(0.5)


def row(server: MlflowServer, runs: Path, kind: str) -> str:
    name = f"faults-{kind}-{int(time.time())}"
    job = Job(f"run.storage_path={runs}", f"run.name={name}", f"tracking.uri={server.uri}",
              f"tracking.experiment={name}")
    wait_points(server, name, job, 4)
    server.stop()
    down = time.time()
    if kind == "mid":
        time.sleep(OUTAGE_S)
        server.start()
        back = time.time()
        rc = job.wait()
    else:
        rc = job.wait()
        server.start()
        back = time.time()
        sync = subprocess.run([sys.executable, str(ROOT / "jobs/sync_tracking.py"), str(runs / name),
                               "--tracking-uri", server.uri], capture_output=True, text=True, timeout=300)
        print(f"  sync_tracking: rc {sync.returncode}: {sync.stdout.strip()[:200]}")
    delivered = job.said("MLflow back") if kind == "mid" else [(time.time(), "sync")]
    run_id, steps = loss_steps(server.uri, name)
    from mlflow.tracking import MlflowClient

    status = MlflowClient(server.uri).get_run(run_id).info.status
    last = max(int(s) for t, line in job.said("[rayssl] step ") for s in [line.split()[2].split("/")[0]])
    expected = list(range(2, last + 1, 2))
    lost, doubled = len(set(expected) - set(steps)), len(steps) - len(set(steps))
    for _, line in job.said("MLflow"):
        print(f"  job: {line.strip()[:200]}")
    recover = delivered[0][0] - back if delivered else float("nan")
    return (f"| tracking server down {'40 s mid-run' if kind == 'mid' else 'through the end of the run'} | after "
            f"4 logged points ({time.strftime('%H:%M:%S', time.localtime(down))}) | job rc {rc}, MLflow run {status} | "
            f"0 | {recover:.1f} s from the server's return to delivery | {lost} of {len(expected)} points lost, "
            f"{doubled} logged twice |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["mid", "end"], choices=["mid", "end"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayssl-faults-") as tmp:
        server = MlflowServer(Path(tmp) / "mlflow")
        server.start()
        try:
            print("\n".join(row(server, Path(tmp) / "runs", kind) for kind in args.rows))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
