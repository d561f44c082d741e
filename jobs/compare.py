"""Compare the runs of an MLflow experiment: a table, a PNG of their curves, optionally a CSV.

    python jobs/compare.py rayssl                                     # default store, all runs
    python jobs/compare.py rayssl --filter "params.objective.mode = 'prior'" --csv runs.csv
    python jobs/compare.py rayssl --tracking-uri sqlite:///$HOME/rayssl_results/mlflow.db --max-runs 5
    python jobs/compare.py rayssl --figure plots/clusters/cluster_class_map.png --max-runs 2   # side by side
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADVICE = """
columns (one row per run, best knn first; blank = not logged):
  mode, K, T_teacher, T_student   objective.mode, num_clusters, teacher/student_temperature params.
  loss, I(X;K), eff_clusters      values at the last logged step of loss, norm/mutual_information,
                                  norm/effective_clusters. I(X;K) near 0 or few effective clusters
                                  means the teacher collapsed (objective.mode=none does, as a control).
  knn, linear                     knn/teacher (online and final teacher k-NN, in [0, 1]) and
                                  linear/top1 (after jobs/evaluate.py).

advice:
  Compare runs that differ in one knob (e.g. objective.mode with the same K, temperatures and
  epochs); otherwise the ranking says little. Narrow the set with --filter, in MLflow's search
  syntax over params (strings), metrics and attributes, joined by AND:
      --filter "params.objective.mode = 'prior' AND params.objective.num_clusters = '1024'"
      --filter 'metrics.`knn/teacher` > 0.5'   (backquote keys with '/', in single quotes)
      --filter "attributes.status = 'FINISHED'"
  The plot shows the --max-runs best runs by knn; lower it when the legend gets crowded.
  --figure puts one figure every run logged next to each other (the --max-runs best runs that have
  it, default 4 there), e.g. the clusters x classes maps of a prior and a center run:
      --figure plots/clusters/cluster_class_map.png --filter "params.objective.num_clusters = '256'"
  Other figures: plots/clusters/gallery_top.png, gallery_tail.png, plots/training_curves.png,
  plots/cluster_usage/epoch_001.png ...; after jobs/evaluate.py, evaluation/cluster_usage.png.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare the rayssl runs of an MLflow experiment.",
                                     epilog=ADVICE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="MLflow experiment name (an unknown one lists those that exist)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else "
                                               "sqlite:///~/rayssl_results/mlflow.db, as jobs/pretrain.py)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.objective.mode = 'prior'\"")
    parser.add_argument("--output", default="compare.png", help="the PNG: curves and k-NN bars, or the --figure "
                        "side by side (default: compare.png)")
    parser.add_argument("--csv", help="also write the table to this CSV (index: full run id)")
    parser.add_argument("--max-runs", type=int, help="runs in the plot, best knn first (default: 10; "
                        "with --figure: 4)")
    parser.add_argument("--figure", metavar="ARTIFACT", help="instead of the curves, this PNG artifact of each run "
                        "side by side, e.g. plots/clusters/cluster_class_map.png")
    args = parser.parse_args(argv)
    if args.max_runs is not None and args.max_runs < 1:
        parser.error("--max-runs must be at least 1")

    from mlflow.exceptions import MlflowException

    from rayssl.compare import CompareError, comparison_plot, runs_table, side_by_side

    uri = args.tracking_uri
    if uri is None:
        from rayssl.tracking import default_uri

        uri = default_uri()
    try:
        table = runs_table(args.experiment, uri, args.filter)
    except (CompareError, MlflowException) as err:  # MlflowException: a malformed --filter
        parser.exit(2, "error: " + " ".join(str(err).split()) + "\n")
    print(table.to_string(index=False, na_rep="", float_format="{:.4g}".format))
    if args.figure:
        try:
            shown = side_by_side(table, args.figure, args.output, uri, args.max_runs or 4)
        except CompareError as err:
            parser.exit(2, f"error: {err}\n")
        print(f"\n{args.figure} of {len(shown)} runs side by side ({', '.join(shown)}): {args.output}")
    else:
        plotted = comparison_plot(table, args.output, uri, args.max_runs or 10)
        print(f"\nplot ({plotted} of {len(table)} runs): {args.output}")
    if args.csv:
        table.to_csv(args.csv)
        print(f"csv: {args.csv}")
    from rayssl.config import mask_uri

    print(f"browse: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:")
          else f"browse: {mask_uri(uri)} in a web browser")
    return 0


if __name__ == "__main__":
    sys.exit(main())
