"""Images/s and images per CPU-second of decode + multi-crop, three ways, on the same S3 shards.

    python benchmarks/input_pipeline.py                             # photos, 2 x 224 + 6 x 96
    python benchmarks/input_pipeline.py --images 600 --paths ray_data,dataloader
    python benchmarks/input_pipeline.py --set fashion-mnist         # the 28 px default recipe

Paths (each delivers uint8 views, or float views for ``worker``, to a consumer that only counts):

- ``ray_data``: rayssl's ``data.decode_on=data``: the ``train`` dataset of
  ``rayssl.data.datasets.build_datasets`` (reads from s3://, ``multicrop_stage``) for one epoch,
  drained by ``iter_batches`` with the training loop's local shuffle buffer.
- ``dataloader``: ``DataLoader(num_workers=--workers)`` over the same shard files (split over
  the workers, read with pyarrow from s3://), the same ``multicrop_stage``, no shuffle buffer.
- ``worker``: ``data.decode_on=worker``: the same dataset holds the encoded rows; the consumer
  process decodes and crops them (``rayssl.train.views.Views``, as a training worker does, on the CPU).

The shards live in a moto S3 server on 127.0.0.1 started here (``moto_server``, its CPU not
counted) and are written by ``jobs/make_shards.py``; the photo set is ``benchmarks/photo_set.py``
with its bad inputs plus a shard of unconverted bad inputs (``photo_set.raw_bad_shard``).
Ray starts once, ``ray.init(num_cpus=2, include_dashboard=False)``, after the DataLoader runs.

Per-core figures are images per CPU-second: user + system time, read from /proc, of every
process of the pipeline during the pass (the benchmark process and its descendants: Ray's
GCS, raylet and workers, or the DataLoader's workers; exited children through their parent's
cutime), so they hold when other jobs share the cores, which wall-clock img/s does not. Each
pass also prints those CPU-seconds by process name (``main``: this process, the consumer, with its
exited children, e.g. DataLoader workers that ended with the pass), the profile
of where a path's extra cost goes.

advice:
  --images      600 while iterating (a pass takes ~10-20 s per path on 2 cores), 3000 to report.
  --passes      pass 1 includes start-up (Ray's first tasks, DataLoader worker forks); the last
                pass is the steady state; 2 is enough.
  --batch-size  consumer batch; the stage itself runs on ``stage_rows`` rows (as training does);
                the DataLoader hands over whole stage outputs (no re-batching, no shuffle).
  overrides     dotted config overrides on top of the set's augment (e.g. augment.local_crops=10).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import photo_set  # noqa: E402
from rayssl.config import load_config  # noqa: E402
from rayssl.data import storage  # noqa: E402
from rayssl.data.datasets import build_datasets, multicrop_stage, plan_data, stage_rows  # noqa: E402
from rayssl.data.shards import load_manifest  # noqa: E402
from rayssl.train.views import Views  # noqa: E402

PHOTO_AUGMENT = ["train.batch_size=64", "data.image_size=256", "augment.global_crop_size=224", "augment.local_crop_size=96",
                 "augment.local_crops=6", "augment.global_crop_scale=[0.14,1.0]",
                 "augment.local_crop_scale=[0.05,0.14]", "augment.blur_prob=1.0", "augment.solarize_prob=0.2"]
TICK = os.sysconf("SC_CLK_TCK")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token files for a throwaway local Ray


def _name(pid: int) -> str:
    """A process's name for the CPU split: Ray's title up to its first "(" (``ray::MapBatches``,
    ``ray::IDLE``), or its program's file name (``raylet``, ``gcs_server``, ``python3``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return "?"
    if argv0.startswith("ray::"):
        return argv0.split("(")[0].split()[0]
    return os.path.basename(argv0.split()[0]) if argv0.strip() else "?"


def _procs() -> dict[int, tuple[int, float]]:
    """``{pid: (ppid, CPU seconds of it and its reaped children)}`` of every process."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            out[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK)
    return out


def cpu_by_process(exclude: set[int]) -> dict[int, float]:
    """``{pid: CPU seconds so far}`` of this process and its descendants, minus the ``exclude`` subtrees."""
    procs, out, todo = _procs(), {}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid not in exclude and pid in procs:
            out[pid] = procs[pid][1]
            todo.extend(children.get(pid, []))
    return out


def cpu_split(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds between two ``cpu_by_process`` samples, summed by process name (the name at
    the end: a Ray worker that ran a crop task and is idle now counts as ``ray::IDLE``)."""
    split: dict[str, float] = {}
    for pid, cpu in after.items():
        name = "main (+ exited children)" if pid == os.getpid() else _name(pid)
        split[name] = split.get(name, 0.0) + cpu - before.get(pid, 0.0)
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))


class ShardStream(IterableDataset):
    """``multicrop_stage`` outputs over shard files, the files split across DataLoader workers."""

    def __init__(self, uri: str, files: list[str], rows: int, stage_kwargs: dict) -> None:
        self.uri, self.files, self.rows, self.kwargs = uri, files, rows, stage_kwargs

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        fs, _ = storage.resolve(self.uri)
        for path in self.files[wid::nw]:
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=self.rows, columns=["image"]):
                    yield multicrop_stage({"image": batch.column("image").to_pylist()}, **self.kwargs)


def measure(batches, exclude: set[int], views=None) -> dict:
    """Drain ``batches``; images, skipped, wall and CPU seconds, all processes and this one alone
    (the consumer: Ray Data's executor and iterator, or the DataLoader's unpickling; ``views``
    decodes and crops here too)."""
    cpu0, own0, t0, n, skipped = cpu_by_process(exclude), _own(), time.perf_counter(), 0, 0
    for batch in batches:
        if views is not None:
            before = views.skipped
            views(batch)
            skipped += views.skipped - before
            n += len(batch["image"])
        else:
            ok = batch["ok"]
            n, skipped = n + len(ok), skipped + int((~ok).sum())
    wall = time.perf_counter() - t0
    split = cpu_split(cpu0, cpu_by_process(exclude))
    return {"images": n, "skipped": skipped, "wall_s": wall, "cpu_s": sum(split.values()),
            "consumer_cpu_s": _own() - own0, "cpu_s_by_process": {k: round(v, 2) for k, v in split.items()}}


def _own() -> float:
    times = os.times()
    return times.user + times.system


def start_moto() -> subprocess.Popen:
    """A moto S3 server on a free 127.0.0.1 port, its endpoint and fake keys in the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            return server
        except Exception:  # not listening yet
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto_server did not start")


def shards(args) -> tuple[str, dict]:
    """Write the chosen set to s3://bench/<set> with jobs/make_shards.py; ``(uri, manifest)``."""
    uri = f"s3://bench/{args.set}"
    if args.set == "fashion-mnist":
        photo_set.make_shards(Path(args.fashion_mnist_dir), uri)
    else:
        folder = photo_set.make_folder(args.folder, args.images, args.bad)
        photo_set.make_shards(folder, uri)
        photos = photo_set.sources()
        photo_set.raw_bad_shard(uri, photo_set.bad_inputs(photos[sorted(photos)[0]], args.bad, seed=2))
    return uri, load_manifest(uri)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=("photos", "fashion-mnist"), default="photos")
    p.add_argument("--folder", type=Path, default=Path("/tmp/rayssl-photos"), help="photo folder (reused)")
    p.add_argument("--images", type=int, default=3000, help="good photos in the set")
    p.add_argument("--bad", type=int, default=3, help="truncated, CMYK and 16-bit inputs, each")
    p.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--paths", default="dataloader,ray_data,worker")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--batch-size", type=int, help="consumer batch (default: train.batch_size, as training: "
                   "64 for photos, the GPU recipe's per-worker batch; 128 for Fashion-MNIST)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (augment.*, data.*)")
    args = p.parse_args()
    augment = PHOTO_AUGMENT if args.set == "photos" else []
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [*augment, *args.overrides])
    args.batch_size = args.batch_size or cfg.train.batch_size
    paths = args.paths.split(",")

    moto = start_moto()
    exclude = {moto.pid}
    try:
        uri, manifest = shards(args)
        fs, root = storage.resolve(uri)
        files = [f"{root}/{s['path']}" for s in manifest["shards"]]
        channels, size = manifest["channels"], cfg.data.image_size or min(manifest["image_size"])
        kwargs = {"augment": cfg.augment.model_dump(), "channels": channels, "size": size}
        rows = stage_rows(cfg.augment, channels)
        print(f"{args.set}: {manifest['num_images']} rows in {len(files)} shards; make_shards skipped "
              f"{manifest['num_skipped']}, converted {manifest['num_converted']}; {size} px -> "
              f"2 x {cfg.augment.global_crop_size} + {cfg.augment.local_crops} x {cfg.augment.local_crop_size}; "
              f"stage {rows} rows, batch {args.batch_size}, shuffle buffer {cfg.data.shuffle_buffer}", flush=True)
        torch.set_num_threads(1)
        results: dict[str, list[dict]] = {}
        if "dataloader" in paths:
            loader = DataLoader(ShardStream(uri, files, rows, kwargs), batch_size=None, num_workers=args.workers)
            results["dataloader"] = [measure(loader, exclude) for _ in range(args.passes)]
        if {"ray_data", "worker"} & set(paths):
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            for name, decode_on in (("ray_data", "data"), ("worker", "worker")):
                if name in paths:
                    run_cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [
                        *augment, *args.overrides, f"data.source={uri}", f"data.decode_on={decode_on}",
                        "train.epochs=1"])
                    plan = plan_data(run_cfg)
                    views = Views(run_cfg, plan.meta, torch.device("cpu")) if decode_on == "worker" else None
                    results[name] = [measure(build_datasets(run_cfg, plan)["train"].iter_batches(
                        batch_size=args.batch_size, batch_format="numpy",
                        local_shuffle_buffer_size=run_cfg.data.shuffle_buffer or None), exclude, views)
                        for _ in range(args.passes)]
            ray.shutdown()
    finally:
        moto.kill()
        moto.wait()
    report(results, args.json)


def report(results: dict[str, list[dict]], path: Path | None) -> None:
    for name, passes in results.items():
        for i, r in enumerate(passes):
            print(f"{name:>10} pass {i + 1}: {r['images']} img ({r['skipped']} skipped) in {r['wall_s']:.1f} s = "
                  f"{r['images'] / r['wall_s']:.0f} img/s; {r['cpu_s']:.1f} CPU-s = "
                  f"{r['images'] / r['cpu_s']:.1f} img per CPU-s (consumer process {r['consumer_cpu_s']:.1f} CPU-s)")
            print("    CPU-s by process: " + ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s_by_process"].items() if v >= 0.05))
    if "dataloader" in results:
        base = results["dataloader"][-1]
        for name in results.keys() - {"dataloader"}:
            last = results[name][-1]
            print(f"{name} / dataloader, last pass: {last['images'] / last['cpu_s'] / (base['images'] / base['cpu_s']):.2f}x "
                  f"per CPU-s, {last['images'] / last['wall_s'] / (base['images'] / base['wall_s']):.2f}x img/s")
    if path:
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
