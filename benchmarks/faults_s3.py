"""Object-store outages measured on a real run: the rows of docs/benchmarks.md's faults table.

    python benchmarks/faults_s3.py clean            # the same run without a fault (its wall time)
    python benchmarks/faults_s3.py reads            # S3 down 30 s during shard reads
    python benchmarks/faults_s3.py upload           # S3 down 30 s during a checkpoint upload
    python benchmarks/faults_s3.py limit            # S3 down past data.outage_limit_s (default 120 s)
    python benchmarks/faults_s3.py reads --window 30 --limit 120 --out docs/benchmarks/faults_s3.jsonl

Everything runs on 127.0.0.1 in this process: a moto S3 server, the tests' fault proxy
(tests/fault_proxy.py) in front of it, and a local Ray. The Fashion-MNIST shards (built once under
``data.cache_dir``, as the default config does) are copied into a bucket; the run reads them and
writes its checkpoints through the proxy (``data.endpoint_url``). The run: the default config on
the first 8,192 images with ``data.deterministic`` (an epoch per Ray Data execution, so epoch 2
reads its shards at step 32), 3 epochs = 96 steps, a checkpoint every 16 steps, MLflow in a
local SQLite store.

- ``reads``: 503 answers for ``--window`` s from the first shard read of epoch 2 on (armed once
  step 16's checkpoint is up; it strikes at the epoch boundary, step 32).
- ``upload``: refused connections for ``--window`` s from the upload of step 48's checkpoint.pt.
- ``limit``: refused connections from the upload of step 48's manifest (its checkpoint.pt is up:
  a half-written folder) until the run stops, ``data.outage_limit_s=--limit``.

Prints one JSON row: when it struck, the outcome, a restart if any (``run.max_failures=0``: an
outage is ridden out in place, nothing is recomputed), seconds to recover (from S3 back to the first request reaching
it, and the run's extra wall time over ``clean`` minus the window when ``--clean-wall`` is
given), MLflow points lost (logged steps missing against the steps trained) and checkpoint files
lost (checkpoints reported but not intact). For ``limit``: the line the run stopped with, the
seconds from the strike to the stop, and the steps since the newest intact checkpoint (lost).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

STEPS, EVERY, LOG_EVERY = 96, 16, 4
OVERRIDES = ["data.train_limit=8192", "data.deterministic=true", "train.time_budget=null", "train.epochs=3",
             f"train.checkpoint_every={EVERY}", f"train.log_every={LOG_EVERY}", "eval.baselines=false",
             "tracking.log_model=false", "run.max_failures=0"]


def s3_setup():
    """moto on 127.0.0.1, a bucket holding the Fashion-MNIST train shards, the proxy before it."""
    import boto3
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    from fault_proxy import FaultProxy
    from rayssl.config import load_config
    from rayssl.data import storage
    from rayssl.data.datasets import plan_data
    from rayssl.train.launch import init_ray

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto = f"http://{host}:{port}"
    bucket = f"faults-{uuid.uuid4().hex[:6]}"
    boto3.client("s3", endpoint_url=moto).create_bucket(Bucket=bucket)
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml")
    local = plan_data(cfg, start_ray=lambda: init_ray(None, verbose=False)).train_uri  # built once, cached
    fs, _ = storage.resolve(f"s3://{bucket}", storage.S3Options(moto))
    pyarrow.fs.copy_files(local, f"{bucket}/fm/train", pyarrow.fs.LocalFileSystem(), fs)
    return server, moto, bucket, FaultProxy(moto).start()


def run_row(row: str, window: float, limit: float, clean_wall: float | None, work: Path) -> dict:
    import mlflow

    from rayssl import checkpoint as checkpoints
    from rayssl.config import load_config
    from rayssl.data import storage
    from rayssl.train.launch import pretrain

    server, moto, bucket, proxy = s3_setup()
    name = f"{row}-{uuid.uuid4().hex[:6]}"
    tracking = f"sqlite:///{work}/mlflow.db"
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [
        *OVERRIDES, f"data.source=s3://{bucket}/fm/train", f"data.endpoint_url={proxy.endpoint}",
        f"data.outage_limit_s={limit}", f"run.storage_path=s3://{bucket}/runs", f"run.name={name}",
        f"tracking.uri={tracking}"])
    folder = r"/checkpoint_[^/?]*_step{:07d}/"
    if row == "reads":  # armed once step 16's checkpoint is up: epoch 2's first shard read
        def arm_after_first_checkpoint():
            deadline = time.time() + 600
            while time.time() < deadline and not any("_step0000016/checkpoint.json" in line
                                                     for _, line in list(proxy.requests)):
                time.sleep(0.2)
            proxy.arm("503", window, method="GET", path=r"/fm/train/shard-")
        threading.Thread(target=arm_after_first_checkpoint, daemon=True).start()
    elif row == "upload":
        proxy.arm("refuse", window, path=folder.format(48) + r"checkpoint\.pt")
    elif row == "limit":
        proxy.arm("refuse", limit + 600, path=folder.format(48) + r"checkpoint\.json")

    started, error, results = time.time(), None, {}
    try:
        results = pretrain(cfg)
    except Exception as err:  # noqa: BLE001 - the limit row's outcome
        error = err
    ended = time.time()
    struck = proxy.windows[0] if proxy.windows else None
    recovered = proxy.recovered(0) if struck and struck[2] is not None else None
    proxy.clear()

    fs, run = storage.resolve(f"s3://{bucket}/runs/{name}", storage.S3Options(moto))
    folders = checkpoints.candidates(fs, run)
    intact = sorted(s["step"] for s in (checkpoints.load_intact(fs, f) for f in folders) if s is not None)
    client = mlflow.MlflowClient(tracking)
    mlrun = client.search_runs([client.get_experiment_by_name("rayssl").experiment_id],
                               f"tags.mlflow.runName = '{name}'")[0]
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    logged = [m.step for m in history]
    last = results["history"][-1]["step"] if results else (max(logged) if logged else 0)
    # Ray Train keeps the newest 2 checkpoints (launch.build_trainer): those must be intact; the
    # limit row's newest is step 32's, the one before the struck upload of step 48
    newest = 48 - EVERY if row == "limit" else last - last % EVERY
    kept = {step for step in (newest - EVERY, newest) if step > 0}
    out = {"row": row, "window_s": window if row in ("reads", "upload") else None, "limit_s": limit,
           "struck": struck and {"mode": struck[0], "request": struck[3], "at_s": round(struck[1] - started, 1)},
           "wall_s": round(ended - started, 1), "mlflow_status": mlrun.info.status, "steps_trained": last,
           "restarted_from_step": results.get("resumed_from_step"),  # None: no restart, nothing recomputed
           "mlflow_points_lost": len(set(range(LOG_EVERY, last + 1, LOG_EVERY)) - set(logged)),
           "intact_checkpoints": intact, "checkpoint_files_lost": len(kept - set(intact)),
           "folders_without_intact_manifest": [f.rsplit("/", 1)[1] for f in folders
                                               if checkpoints.load_intact(fs, f) is None]}
    if recovered is not None:
        out["first_request_after_s3_back_s"] = round(recovered, 2)
        out.update(stall(history, struck[1], struck[2]))
    if row == "upload" and struck and struck[2] is not None:  # the struck checkpoint's manifest landed
        folder_name = struck[3].split("/checkpoint.pt")[0].rsplit("/", 1)[1]
        done = [t for t, line in list(proxy.requests) if f"{folder_name}/checkpoint.json?uploadId" in line]
        out["upload_done_after_s3_back_s"] = round(done[-1] - struck[2], 2) if done else None
    if clean_wall is not None and row != "limit":
        out["extra_wall_over_clean_minus_window_s"] = round(out["wall_s"] - clean_wall - window, 1)
    if error is not None:
        outage = storage.find_outage(error)
        out["stopped_with"] = str(outage) if outage else f"{type(error).__name__}: {str(error)[:300]}"
        out["error_type"] = type(error).__name__
        out["seconds_from_strike_to_stop"] = round(ended - struck[1], 1) if struck else None
        out["steps_lost_since_newest_checkpoint"] = last - max(intact, default=0)
    proxy.stop()
    server.stop()
    return out


def stall(history, started: float, ended: float) -> dict:
    """The logged steps around an outage (MLflow timestamps): the gap between the last step logged
    before it and the first logged after S3 came back, a typical gap (the median), and what the
    outage cost beyond its window: gap - typical - window (below 0: training went on meanwhile)."""
    import statistics

    times = sorted((m.step, m.timestamp / 1000) for m in history)
    gaps = [b[1] - a[1] for a, b in zip(times, times[1:])]
    before = max((t for _, t in times if t <= started), default=None)
    after = min((t for _, t in times if t >= ended), default=None)
    if before is None or after is None or not gaps:
        return {}
    typical = statistics.median(gaps)
    return {"logged_gap_across_outage_s": round(after - before, 1), "typical_logged_gap_s": round(typical, 1),
            "cost_beyond_window_s": round(after - before - typical - (ended - started), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", choices=["clean", "reads", "upload", "limit"])
    parser.add_argument("--window", type=float, default=30.0, help="seconds S3 is down (reads, upload)")
    parser.add_argument("--limit", type=float, default=120.0, help="data.outage_limit_s")
    parser.add_argument("--clean-wall", type=float, help="wall seconds of the clean row, to subtract")
    parser.add_argument("--out", help="append the row as a JSON line to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rayssl-faults-s3-") as work:
        row = run_row(args.row, args.window, args.limit, args.clean_wall, Path(work))
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
