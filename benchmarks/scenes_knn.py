"""Raw-pixel k-NN of a scenes construction on the validation split (docs/benchmarks.md, [2/6]).

    python benchmarks/scenes_knn.py --name frozen                       # the frozen RECIPE
    python benchmarks/scenes_knn.py --name alpha blend=alpha 'crop=[0.3, 1.0]'
    python benchmarks/scenes_knn.py --name plain --plain                # Fashion-MNIST itself

The protocol of ``benchmarks/levers.py`` and the job's raw-pixel row: the scenes of the 60k
Fashion-MNIST *train* images (``rayssl.data.scenes.scenes``, the train split's parameters), the
first 50k as the bank, the last 10k as the queries; features are the images in [0, 1],
flattened, centred by the bank mean (``eval.center``) and L2-normalised; weighted 20-NN at
temperature 0.07 (``rayssl.knn``). The test split is never read. ``key=value`` arguments
replace fields of ``RECIPE`` (YAML values). Appends one JSON line to ``--out`` (its centered row
``raw_pixels/centered``; lines written before eval.centre became eval.center say ``raw_pixels/centred``); ``--grid PNG``
also saves the first 64 images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rayssl.data import scenes  # noqa: E402
from rayssl.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from rayssl.eval.protocol import bank_mean  # noqa: E402
from rayssl.knn import knn_accuracy  # noqa: E402

TRAIN = 50_000


def recipe(overrides: list[str]) -> scenes.Recipe:
    """``RECIPE`` with ``key=value`` fields replaced (lists become tuples)."""
    fields = {}
    for item in overrides:
        key, _, value = item.partition("=")
        v = yaml.safe_load(value)
        fields[key] = tuple(v) if isinstance(v, list) else v
    return dataclasses.replace(scenes.RECIPE, **fields)


def raw_knn(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Weighted 20-NN of the flattened pixels in [0, 1]: as is and centred by the bank mean."""
    f = torch.from_numpy(np.array(x.reshape(len(x), -1), dtype=np.float32)) / 255
    labels = torch.from_numpy(y)
    bank, query = f[:TRAIN], f[TRAIN:]
    m = bank_mean(bank)
    return {"raw_pixels": knn_accuracy(bank, labels[:TRAIN], query, labels[TRAIN:], 10),
            "raw_pixels/centered": knn_accuracy(bank - m, labels[:TRAIN], query - m, labels[TRAIN:], 10)}


def grid(x: np.ndarray, path: str, n: int = 8, zoom: int = 3) -> None:
    """The first n x n images as one PNG, enlarged ``zoom`` times."""
    from PIL import Image

    tiles = x[:n * n]
    if tiles.ndim == 3:
        tiles = np.repeat(tiles[..., None], 3, axis=3)
    h, w = tiles.shape[1:3]
    sheet = tiles.reshape(n, n, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(n * h, n * w, 3)
    Image.fromarray(sheet).resize((n * w * zoom, n * h * zoom), Image.Resampling.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--plain", action="store_true", help="Fashion-MNIST itself (28 px gray), no scenes")
    p.add_argument("--seed", type=int, default=scenes.SEED)
    p.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", help="save the first 64 images to this PNG")
    p.add_argument("--out", default=str(ROOT / "docs/benchmarks/scenes.jsonl"))
    p.add_argument("overrides", nargs="*", help="RECIPE fields, key=value")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x, y = load_fashion_mnist(args.fashion_mnist_dir, "train")
    r = recipe(args.overrides)
    start = time.time()
    if not args.plain:
        x = scenes.scenes(x, scenes.load_photos(side=r.photo_side), args.seed, "train", r)
    built = time.time() - start
    result = {"name": args.name, "recipe": None if args.plain else dataclasses.asdict(r),
              "seed": args.seed, "build_seconds": round(built, 1)}
    result.update({k: round(v, 4) for k, v in raw_knn(x, y).items()})
    if args.grid:
        grid(x, args.grid)
    print(json.dumps(result), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
