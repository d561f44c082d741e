"""Images/s of read + decode + multi-crop on the same Parquet shards: Ray Data vs DataLoader.

    python benchmarks/data_throughput.py                       # Fashion-MNIST cache shards
    python benchmarks/data_throughput.py --shards s3://bucket/prefix augment.local_crops=6

Both pipelines run the same stage function (``rayssl.data.datasets.multicrop_stage``: decode,
resize, batched multi-crop, uint8 views) on the same shards, and the consumer only counts
rows; both apply the stage to ``stage_rows`` rows at a time (as training does). Ray Data:
``read_parquet`` -> ``map_batches`` -> ``iter_batches`` of ``--batch-size`` with the training
loop's local shuffle buffer, on a local Ray with ``--cpus`` CPUs. DataLoader: an
IterableDataset that splits the shard files over ``--workers`` processes, reads them with
pyarrow, and yields one stage output per call. Each pipeline makes ``--epochs`` passes over
all shards; the first pass includes start-up. Results go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayssl.config import load_config  # noqa: E402
from rayssl.data import storage  # noqa: E402
from rayssl.data.datasets import multicrop_stage, read_shards, stage_rows  # noqa: E402
from rayssl.data.shards import load_manifest, make_shards  # noqa: E402


class ShardStream(IterableDataset):
    """Batches of ``stage(batch)`` over shard files, the files split across DataLoader workers."""

    def __init__(self, uri: str, files: list[str], batch_size: int, stage_kwargs: dict) -> None:
        self.uri, self.files, self.batch_size, self.kwargs = uri, files, batch_size, stage_kwargs

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        fs, _ = storage.resolve(self.uri)
        for path in self.files[wid::nw]:
            with fs.open_input_file(path) as f:
                for record_batch in pq.ParquetFile(f).iter_batches(batch_size=self.batch_size, columns=["image"]):
                    yield multicrop_stage({"image": record_batch.column("image").to_pylist()}, **self.kwargs)


def count(batches) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch["ok"])
    return n, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shards URI; default: the Fashion-MNIST cache (built if missing)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (augment.*, data.*)")
    args = p.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/fashion_mnist.yaml", args.overrides)

    import ray
    import ray.data

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    uri = args.shards
    if uri is None:
        uri = str(Path(cfg.data.cache_dir).expanduser() / "fashion-mnist" / "train")
        make_shards(cfg.data.fashion_mnist_dir, uri, split="train")
    manifest = load_manifest(uri)
    fs, root = storage.resolve(uri)
    files = [f"{root}/{s['path']}" for s in manifest["shards"]]
    size = cfg.data.image_size or min(manifest["image_size"] or [cfg.augment.global_crop_size])
    kwargs = {"augment": cfg.augment.model_dump(), "channels": manifest["channels"], "size": size}
    rows = stage_rows(cfg.augment, manifest["channels"])
    print(f"{len(files)} shards, {manifest['num_images']} images per pass, stage {rows} rows, "
          f"batch {args.batch_size}, {size} px, {2 + cfg.augment.local_crops} views")

    torch.set_num_threads(1)
    results = {}
    ds = (read_shards(uri, manifest, fs, root, shuffle=True).select_columns(["image"])
          .map_batches(multicrop_stage, batch_size=rows, batch_format="numpy", fn_kwargs=kwargs))
    results["ray_data"] = [count(ds.iter_batches(batch_size=args.batch_size, batch_format="numpy",
                                                 local_shuffle_buffer_size=cfg.data.shuffle_buffer or None))
                           for _ in range(args.epochs)]
    loader = DataLoader(ShardStream(uri, files, rows, kwargs), batch_size=None,
                        num_workers=args.workers, persistent_workers=False)
    results["dataloader"] = [count(loader) for _ in range(args.epochs)]

    rates = {}
    for name, passes in results.items():
        rates[name] = [n / s for n, s in passes]
        print(f"{name:>10}: " + ", ".join(f"pass {i + 1}: {n} img in {s:.1f} s = {n / s:.0f} img/s"
                                          for i, (n, s) in enumerate(passes)))
    ratio = [r / d for r, d in zip(rates["ray_data"], rates["dataloader"])]
    print("ratio Ray Data / DataLoader: " + ", ".join(f"pass {i + 1}: {x:.2f}x" for i, x in enumerate(ratio)))


if __name__ == "__main__":
    main()
