"""Wall time of ``rayssl.eval.gallery.embedding_map`` (PCA to 50, then t-SNE) on random features.

    python benchmarks/embedding_map.py                 # 10,000 images, 256-d features, 10 classes
    python benchmarks/embedding_map.py --points 5000 --pca

Prints the seconds of the projection and drawing, and of saving the PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.eval.gallery import embedding_map  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--pca", action="store_true", help="PCA only, no t-SNE")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.points)
    centres = rng.standard_normal((args.classes, args.dim))
    feats = (centres[labels] + rng.standard_normal((args.points, args.dim))).astype(np.float32)
    names = [f"class {c}" for c in range(args.classes)]
    started = time.perf_counter()
    fig = embedding_map(feats, labels, names, tsne=not args.pca, max_points=args.points)
    drawn = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "map.png")
    saved = time.perf_counter()
    print(f"{args.points} points, {args.dim}-d, {'PCA' if args.pca else 't-SNE'}: "
          f"embedding_map {drawn - started:.1f} s, savefig {saved - drawn:.1f} s")


if __name__ == "__main__":
    main()
