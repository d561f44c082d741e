"""Deliver what MLflow missed: the backlog a run left because its tracking server did not answer
when training ended.

    python jobs/sync_tracking.py ~/rayssl_results/RUN
    python jobs/sync_tracking.py s3://bucket/runs/RUN/tracking_backlog --tracking-uri http://mlflow:5000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import ConfigError  # noqa: E402

HOW = """
what it does:
  World rank 0 keeps what MLflow did not take in order (metrics with the step and time they were
  logged, params, tags, artifacts, the model, the final status). If MLflow still did not answer
  when training ended, it wrote that backlog beside the checkpoints: RUN/tracking_backlog/ (a
  JSON-lines file per launch plus its files; the job's report names the folder). This command
  replays it into the same MLflow run, in order, the model rebuilt from its config and weights,
  then sets the run's recorded final status, and says what it delivered.

  Running it again delivers nothing twice: it records its progress (<stamp>.delivered) and
  skips metric points whose step the run already has. If MLflow stops answering midway, run it
  again: it goes on where it stopped. S3 credentials come from the AWS chain (AWS_* env vars,
  AWS_PROFILE, role) and AWS_ENDPOINT_URL, MLflow credentials from MLFLOW_TRACKING_USERNAME /
  _PASSWORD / _TOKEN.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replay a run's MLflow backlog into its MLflow run (rayssl).",
                                     epilog=HOW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the run folder (where its checkpoints are: a local path or "
                                       "s3://bucket/prefix/RUN), or its tracking_backlog folder")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="the MLflow store to deliver to; default MLFLOW_TRACKING_URI, else the one the "
                             "backlog recorded (pass it here when that one had a password, which was masked)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # what it delivered, nothing else

    from rayssl.tracking_backlog import sync

    try:
        lines = sync(args.folder, args.tracking_uri)
    except ConfigError as err:
        parser.exit(1, f"error: {err}\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
