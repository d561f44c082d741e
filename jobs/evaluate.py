"""Evaluate a pretraining checkpoint: k-NN, linear probe, clustering quality, embedding export.

    python jobs/evaluate.py --checkpoint ~/rayssl_results/RUN            # latest checkpoint of a run
    python jobs/evaluate.py --checkpoint s3://bucket/runs/RUN/checkpoint_.../checkpoint.pt --export
    python jobs/evaluate.py --checkpoint RUN data.source=s3://b/train data.eval_source=s3://b/val
    python jobs/evaluate.py --checkpoint RUN --gallery      # + what the clusters hold, as PNGs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import ConfigError, help_text, load_config  # noqa: E402

ADVICE = """
what it reports (results.json, and a table here):
  knn/top1_kK               weighted K-NN (T = eval.knn_temperature) of L2-normalised teacher backbone
                            features: data.source shards are the bank, data.eval_source the queries.
                            eval.knn_train_limit caps the bank.
                            The feature protocol, alike for every row: BatchNorm statistics recomputed
                            on eval.precise_bn_images clean bank images (0 keeps training's), and
                            features centred by the bank mean before the L2 norm (eval.center).
  linear/top1               logistic regression on frozen features, LR x weight decay picked on a
                            10 % validation split of the bank.
  raw_pixels/*, random_init/*
                            the floors of both (eval.baselines, default true): the same k-NN and
                            linear probe on the image's pixels (resized as for the teacher, in
                            [0, 1]) and on the backbone at its random initialisation (train.seed,
                            built as training builds it; same preprocessing). They roughly triple
                            the probe time; eval.baselines=false skips them.
  cluster/nmi, ari, hungarian_accuracy, majority_accuracy
                            how the teacher's argmax clusters match the classes (sklearn / scipy);
                            with K >> classes, majority_accuracy is the meaningful one.
  cluster/mutual_information, effective_clusters, empty_clusters
                            docs/theory.md section 6 over the whole evaluation set; a collapsed run
                            has I(X;K) near 0 and few effective clusters.

what the clusters hold (--gallery, PNGs next to results.json, logged with it):
  gallery_top.png           the --gallery-clusters most-used clusters of the evaluation images, one row
                            each: its share of the images, majority class and purity, its most
                            confident images (the teacher's max probability) and class histogram.
                            Rows of one class, or of one visual trait, say the clusters mean something.
  gallery_tail.png          the same for the least-used clusters still used: noise, or rare content?
  cluster_class_map.png     clusters x classes (share of each cluster's images): a staircase means
                            clean clusters; the title repeats cluster/majority_accuracy and cluster/nmi.
  embedding_map.png         t-SNE of the evaluation features coloured by class: separated classes are
                            what the k-NN sees. The extra pass reads only the images shown; the t-SNE
                            costs most (it subsamples above 10000 images).

overrides:
  data.*, eval.* change what is evaluated; model.* and objective.* must match the checkpoint.
  --actors N                feature-extraction actors (default: GPUs if any, else 1); each holds a
                            copy of the backbone; give Ray Data spare CPUs for decoding.
"""


def epilog() -> str:
    """What the job reports, then the data.* and eval.* keys, generated from the config model's
    field descriptions."""
    return (ADVICE + "\nthe data.* and eval.* keys (key: type = default, the model's; the checkpoint's config\n"
            "gives their values unless overridden):\n\n" + help_text(sections=("data", "eval")))


def baselines(results: dict) -> list[tuple[str, str]]:
    """(name, key prefix) of each baseline evaluated in ``results``."""
    from rayssl.eval.evaluate import BASELINES

    return [(name, f"{name}/") for name in BASELINES if f"{name}/linear/top1" in results]


def summary(results: dict, ks: tuple[int, ...]) -> list[str]:
    """Top-1 of the teacher and its floors (rows) by k-NN per k and linear probe (columns), then
    the teacher's other numbers."""
    cells, floors = [*(f"knn/top1_k{k}" for k in ks), "linear/top1"], baselines(results)
    lines = [f"  {'top-1':12s}" + "".join(f"{h:>12s}" for h in [*(f"k-NN k={k}" for k in ks), "linear"])]
    lines += [f"  {name:12s}" + "".join(f"{results[prefix + c]:12.4f}" for c in cells)
              for name, prefix in [("teacher", ""), *floors]]
    lines += [f"  {key:32s} {value:.4f}" if isinstance(value, float) else f"  {key:32s} {value}"
              for key, value in results.items()
              if "/" in key and key not in cells and not key.startswith(tuple(p for _, p in floors))]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint.pt, a checkpoint_* folder or a run folder (its latest); local or s3://")
    parser.add_argument("--output", help="folder for results.json, plots and exports (default: eval/<name>)")
    parser.add_argument("--export", action="store_true", help="write embeddings-{train,eval}.parquet")
    parser.add_argument("--gallery", action="store_true",
                        help="also draw what the clusters hold: gallery_{top,tail}.png, cluster_class_map.png, "
                        "embedding_map.png (see below)")
    parser.add_argument("--gallery-clusters", type=int, default=32, metavar="N",
                        help="clusters per gallery, most-used and least-used (default: 32)")
    parser.add_argument("--ks", default="10,20,100,200", help="k values of the k-NN (default: 10,20,100,200)")
    parser.add_argument("--actors", type=int, help="feature-extraction actors")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Ray Data's logs on the console (default: in Ray's log folder, "
                        "rayssl-driver.log beside the workers' logs)")
    parser.add_argument("--tracking-uri", help="MLflow store of the run (default: MLFLOW_TRACKING_URI, else the "
                        "one the run used); the evaluation is added to the checkpoint's MLflow run")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the run's config")
    args = parser.parse_args(argv)

    from rayssl.eval.backbone import read_checkpoint

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
        if args.gallery_clusters < 1:
            raise ValueError(f"--gallery-clusters {args.gallery_clusters}: at least 1")
        state = read_checkpoint(args.checkpoint)  # fails fast, before Ray starts
        cfg = load_config(None, args.overrides, base=state["config"]) if args.overrides else None
        from rayssl.eval.evaluate import evaluate
        from rayssl.train.launch import init_ray

        init_ray(args.address, verbose=args.verbose)
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        name = Path(args.checkpoint.rstrip("/")).name
        output = args.output or os.path.join("eval", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        results = evaluate(args.checkpoint, cfg, output, ks=ks, do_export=args.export,
                           actors=args.actors or max(1, gpus), use_gpu=gpus > 0, gallery=args.gallery,
                           gallery_clusters=args.gallery_clusters)
    except (ConfigError, ValueError) as err:
        parser.exit(2, f"error: {err}\n".replace("\n", " ").rstrip() + "\n")
    print(f"\nevaluation of {args.checkpoint} (step {results['step']}): "
          f"{results['num_train']} bank / {results['num_eval']} eval images")
    print("\n".join(summary(results, ks)))
    print(f"results: {Path(output) / 'results.json'}")
    from rayssl.eval.evaluate import GALLERY_FILES
    from rayssl.tracking import log_evaluation

    logged = ["results.json", "cluster_usage.png", *(GALLERY_FILES if args.gallery else ())]
    files = [p for p in (Path(output) / n for n in logged) if p.exists()]
    if args.gallery:
        print(f"gallery: {', '.join(str(p) for p in files if p.name in GALLERY_FILES)}")
    run_id = log_evaluation(state.get("tracking"), results["step"], results, files, args.tracking_uri)
    if run_id:
        names = ", ".join(["knn/top1_k*", "linear/*", "cluster/*", *(f"{name}/*" for name, _ in baselines(results))])
        print(f"logged to MLflow run {run_id} (metrics {names}; artifacts evaluation/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
