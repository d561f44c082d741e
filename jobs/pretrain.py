"""Pretrain an image backbone by clustering SSL on Ray.

    python jobs/pretrain.py                                   # Fashion-MNIST, local Ray
    python jobs/pretrain.py --config configs/fashion_mnist.yaml objective.mode=center train.epochs=3
    python jobs/pretrain.py data.source=s3://bucket/train data.eval_source=s3://bucket/val   # shards from make_shards.py
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/pretrain.py
"""

from __future__ import annotations

import time

STARTED = time.time()  # the job's clock (train.time_budget_scope=job), read before the imports

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import ConfigError, help_text, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"


def epilog() -> str:
    """The config keys for ``--help``, generated from the config model's field descriptions."""
    return ("config keys (key: type = default), in the --config YAML or as key=value overrides; the same\n"
            "names are the MLflow params. The defaults are the model's: the --config file (default\n"
            "configs/fashion_mnist.yaml) sets some of them.\n\n" + help_text())


def final_report(cfg, results: dict, wall_seconds: float) -> str:
    """The run's report (``rayssl.report``), also logged to its MLflow run as ``report.md``. It
    says so when MLflow's backlog was left in the run folder; ``report.md`` joins that backlog
    when MLflow cannot take it either."""
    from rayssl import report, tracking
    from rayssl.data.storage import S3Options
    from rayssl.tracking_backlog import RunFolder, pending
    from rayssl.train.launch import run_uri

    folder = RunFolder.of(run_uri(cfg, results["run_path"]), S3Options.for_runs(cfg.data))
    left = "mlflow_run_id" in results and pending(folder)
    text = report.render(results, cfg.redacted(), wall_seconds, folder.uri, results.get("mlflow"),
                         folder.uri if left else None)
    if "mlflow_run_id" in results:
        tracking.log_report(tracking.tracking_uri(cfg), results["mlflow_run_id"], text, folder)
    return text


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """The job; ``started``: when it started (the process's first line), default now."""
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: configs/fashion_mnist.yaml)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Ray Data's logs on the console too (run.verbose=true); by default "
                             "they go to Ray's log folder and the console shows rayssl's lines and a progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. objective.mode=center train.epochs=3")
    args = parser.parse_args(argv)
    started = time.time() if started is None else started
    try:
        cfg = load_config(args.config, args.overrides + (["run.verbose=true"] if args.verbose else []))
    except ConfigError as err:
        parser.exit(2, f"config error: {err}\n")

    from rayssl.checkpoint import DiskFull
    from rayssl.train.launch import pretrain
    from rayssl.train.step import NonFiniteError
    from rayssl.train.watchdog import StallError
    from rayssl.train.stop import JobStopped

    try:
        results = pretrain(cfg, started)
    except ConfigError as err:  # inputs found wrong once Ray and the data are in reach
        parser.exit(2, f"error: {err}\n")
    except NonFiniteError as err:
        parser.exit(1, f"stopped: {err}\n")
    except DiskFull as err:  # a checkpoint run.storage_path's disk could not take; the older ones are intact
        parser.exit(1, f"stopped: {err}\n")
    except StallError as err:  # no batch within run.stall_timeout: the line names what Ray cannot place
        parser.exit(1, f"{err}\n")
    except JobStopped as err:  # SIGTERM (ray job stop) or SIGINT (Ctrl-C): the run is KILLED in MLflow
        if err.abandoned:  # training still runs in a thread: exit now, before `ray job stop`'s SIGKILL
            print(err, file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(err.code)
        parser.exit(err.code, f"{err}\n")
    print("\n" + final_report(cfg, results, time.time() - started))
    if results.get("stopped") == "collapse":
        print(f"stopped early: {results['stop_reason']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(started=STARTED))
