"""Ray Data datasets for training and evaluation: Parquet shards -> decoded, augmented batches.

``train`` streams the shards, one Ray Data execution for the whole run (a fresh shard order
every epoch, plus each worker's local shuffle buffer; an epoch per execution with
``data.deterministic``, seeded, and with ``data.decode_on=data``), one task per shard that
reads it and, with ``data.decode_on=data``, decodes and builds the multi-crop views, so that
training workers only train. ``knn_bank`` (labelled training shards) and ``eval`` (the
evaluation split, ``data.eval_source``) are decoded without augmentation for the k-NN
evaluation. A sample that fails to decode is kept as a row with ``ok=False``: the worker skips
and counts it, so every worker still sees the same number of rows and steps.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data._internal.datasource.range_datasource import RangeDatasource

from rayssl.config import AugmentConfig, ConfigError
from rayssl.data import scenes, storage
from rayssl.data.images import Limits, decode_batch
from rayssl.data.meta import DataMeta
from rayssl.data.shards import load_manifest, make_shards


def _fashion_mnist(data_cfg, start_ray) -> tuple[str, str]:
    """Shards of the Fashion-MNIST IDX files, built once under ``data.cache_dir`` (``start_ray``
    is called first when they have to be built)."""
    root = Path(data_cfg.cache_dir).expanduser() / "fashion-mnist"
    with _field("data.fashion_mnist_dir"):
        storage.check_readable(data_cfg.fashion_mnist_dir)
        for split in ("train", "test"):
            make_shards(data_cfg.fashion_mnist_dir, str(root / split), split=split, min_shards=8,
                        progress=lambda line: None, start_ray=start_ray, limits=Limits.of(data_cfg))
    return str(root / "train"), str(root / "test")


def _fashion_mnist_scenes(data_cfg) -> tuple[str, str]:
    """Shards of Fashion-MNIST on photos (``rayssl.data.scenes``), built once under
    ``data.cache_dir`` from the IDX files of ``data.fashion_mnist_dir``; no Ray."""
    root = Path(data_cfg.cache_dir).expanduser() / scenes.NAME
    with _field("data.fashion_mnist_dir"):
        storage.check_readable(data_cfg.fashion_mnist_dir)
    with _field("data.source"):  # a missing or unreadable photo, named
        for split in ("train", "test"):
            scenes.build(data_cfg.fashion_mnist_dir, str(root / split), split, progress=lambda line: None)
    return str(root / "train"), str(root / "test")


@contextmanager
def _field(name: str):
    """Prefix a ``ConfigError`` (e.g. a ``StorageError`` naming a URI) with the config field."""
    try:
        yield
    except ConfigError as err:
        raise type(err)(f"{name}: {err}") from None


def _manifest(name: str, uri: str, data_cfg) -> dict:
    with _field(name):
        s3 = storage.S3Options.for_data(data_cfg)
        storage.check_readable(uri, s3)
        return load_manifest(uri, s3)


def _adapt(stats: list[float], channels: int) -> tuple[float, ...]:
    """Per-channel statistics for ``channels``: the mean of RGB for gray, gray repeated for RGB."""
    if len(stats) == channels:
        return tuple(stats)
    return (float(np.mean(stats)),) if channels == 1 else tuple(stats) * 3


def shard_pieces(manifest: dict, root: str, limit: int | None) -> list[tuple[str, int]]:
    """``(path, rows)`` of the shards that hold the first ``limit`` images (all when None), in
    manifest order: the last piece is cut at the limit, so every epoch reads the same images."""
    pieces, left = [], limit or manifest["num_images"]
    for shard in manifest["shards"]:
        if left <= 0:
            break
        pieces.append((f"{root}/{shard['path']}", min(shard["num_images"], left)))
        left -= pieces[-1][1]
    return pieces


def read_pieces(batch: dict, pieces: list[tuple[str, int]], fs, block_rows: int, stage=None,
                stage_kwargs: dict | None = None, s3: storage.S3Options | None = None):
    """Ray Data stage: ``id`` (an index into ``pieces``) -> that piece's ``image`` column, in
    blocks of ``block_rows`` rows, each passed through ``stage(batch, **stage_kwargs)`` when given.
    A storage outage is ridden out up to ``s3.outage_limit_s`` (``read_piece``)."""
    for i in batch["id"]:
        path, rows = pieces[int(i)]
        for table in read_piece(fs, path, rows, block_rows, s3):
            yield table if stage is None else stage(
                {"image": table.column("image").to_numpy(zero_copy_only=False)}, **stage_kwargs)


def read_piece(fs, path: str, rows: int, block_rows: int, s3: storage.S3Options | None = None):
    """The first ``rows`` rows of a shard's ``image`` column, as tables of at most ``block_rows``.

    Through a storage outage (``storage.Outage``: refused or cut connections, 5xx answers) the
    shard is opened again with backoff, up to ``data.outage_limit_s``, and the read resumes after
    the rows already given: no row is lost or given twice. Past the limit, ``StorageOutage``."""
    done, outage = 0, storage.Outage(path, s3, "reading shards")
    while done < rows:
        try:
            with fs.open_input_file(path) as f:
                start = 0  # row of the file where this block starts
                for part in pq.ParquetFile(f).iter_batches(batch_size=block_rows, columns=["image"]):
                    part, start = part.slice(max(0, done - start), rows - done), start + part.num_rows
                    outage.ok()
                    if part.num_rows:
                        done += part.num_rows
                        yield pa.Table.from_batches([part])
                    if done >= rows:
                        return
            return  # the file holds fewer rows than the manifest says: what it holds
        except OSError as err:
            outage.failed(err)


def run_order(num_pieces: int, epochs: int, seed: int | None) -> np.ndarray:
    """Piece indices of ``epochs`` epochs, each a permutation of the pieces: drawn from ``seed``
    (the same orders on every call) or fresh."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(num_pieces) for _ in range(epochs)])


def train_stream(uri: str, manifest: dict, data_cfg, block_rows: int, epochs: int, seed: int | None,
                 stage=None, stage_kwargs: dict | None = None, cpus: float = 1.0) -> ray.data.Dataset:
    """``epochs`` epochs of the first ``data.train_limit`` images (all when None) in one Ray Data
    execution, each epoch in its own shard order (``run_order``; from ``seed`` with
    ``data.deterministic``, so a resume replays its epoch; one unseeded epoch: a fresh order for
    every execution), read by one task per shard in
    ``block_rows``-row blocks, each block through ``stage`` in the same task when given; each task
    asks for ``cpus`` logical CPUs (``Config.data_cpus``).

    One execution for many epochs, so the stream runs on across epoch boundaries instead of
    starting a new execution (its tasks, split and prefetch) at each (docs/benchmarks.md, [5/5]).
    Nothing bounds how far Ray Data reads ahead: every epoch's bytes are read in the first
    seconds, which the workers spend on the k-NN baselines when the run has them (``TrainRun.run``
    opens the stream before them); a stage would crop every epoch ahead, hence one epoch per execution with one.
    The orders are drawn once, when the dataset is built: a relaunch after a failure reads the
    same shard orders (its local shuffle and crops differ).

    A lazy ``range`` over the shards, not ``read_parquet``, so the crops run in the read's task
    (Ray Data does not fuse a read with a batched map), and ``stage`` inside the read, not a second
    ``map_batches``: Ray Data would fuse that map, but its ``batch_size`` becomes the fused task's
    minimum input, so one task took every shard and the crops used one core of two
    (docs/benchmarks.md, [4/5]).
    """
    fs, root = storage.resolve(uri, storage.S3Options.for_data(data_cfg))
    pieces = shard_pieces(manifest, root, data_cfg.train_limit)
    run = [pieces[i] for i in run_order(len(pieces), epochs, seed)]
    kwargs = {"pieces": run, "fs": fs, "block_rows": block_rows, "stage": stage, "stage_kwargs": stage_kwargs,
              "s3": storage.S3Options(endpoint_url=data_cfg.endpoint_url, outage_limit_s=data_cfg.outage_limit_s)}
    # a task per piece; past 4096 (or one epoch's pieces), a task reads a few consecutive pieces
    blocks = min(len(run), max(len(pieces), 4096))
    # ``ray.data.range``, but with the tasks' CPUs: a read and a map fuse only when they ask the same
    ids = ray.data.read_datasource(RangeDatasource(n=len(run), block_format="arrow", column_name="id"),
                                   override_num_blocks=blocks, num_cpus=cpus)
    if seed is None and epochs == 1:  # an epoch per execution: a fresh shard order for each
        ids = ids.randomize_block_order()
    return ids.map_batches(read_pieces, batch_size=1, batch_format="numpy", fn_kwargs=kwargs, num_cpus=cpus)


def sources(data_cfg, start_ray=None) -> tuple[str, dict, str | None, dict | None]:
    """``(train URI, its manifest, eval URI, its manifest)``; the eval pair is None without
    ``data.eval_source`` (Fashion-MNIST and its scenes: the test split). Errors name the field and URI."""
    if data_cfg.source in ("fashion-mnist", scenes.NAME):
        if data_cfg.source == "fashion-mnist":
            train_uri, eval_uri = _fashion_mnist(data_cfg, start_ray)
        else:
            train_uri, eval_uri = _fashion_mnist_scenes(data_cfg)
        eval_uri = data_cfg.eval_source or eval_uri
    else:
        train_uri, eval_uri = data_cfg.source, data_cfg.eval_source
    train = _manifest("data.source", train_uri, data_cfg)
    eval_manifest = _manifest("data.eval_source", eval_uri, data_cfg) if eval_uri else None
    return train_uri, train, eval_uri, eval_manifest


def read(uri: str, manifest: dict, data_cfg, columns: list[str], limit: int | None,
         cpus: float = 1.0) -> ray.data.Dataset:
    """The shards' ``columns``, the first ``limit`` rows (all when None), in manifest order; each
    read task asks for ``cpus`` logical CPUs.

    Uses Ray Data's V1 Parquet reader: the V2 reader starts 32 footer-reading actors for every
    pass, several times the V1 reader's cost per epoch on small machines (docs/benchmarks.md).
    """
    options = storage.S3Options.for_data(data_cfg)
    fs, root = storage.resolve(uri, options)
    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:  # read_parquet reads a footer now: an outage then is ridden out like the run's own reads
        ds = storage.ride_out(lambda: ray.data.read_parquet([f"{root}/{s['path']}" for s in manifest["shards"]],
                                                            filesystem=fs, num_cpus=cpus),
                              uri, options, "reading the shards' schema")
    finally:
        ctx.use_datasource_v2 = v2
    ds = ds.select_columns(columns)
    return ds.limit(limit) if limit is not None else ds


def decode_stage(batch: dict, channels: int, size: int, limits: Limits = Limits()) -> dict:
    """Ray Data stage: encoded ``image`` -> uint8 (B, size, size, C) ``image``, ``label`` (-1 when
    missing) and ``ok`` (False past ``limits``, as for an undecodable image); ``id`` passes through."""
    images, ok = decode_batch(batch["image"], channels, size, limits)
    labels = np.array([-1 if v is None or v != v else int(v) for v in batch["label"]], dtype=np.int64)
    ids = {"id": batch["id"]} if "id" in batch else {}
    return {**ids, "image": images, "label": labels, "ok": ok}


def multicrop_stage(batch: dict, augment: dict, channels: int, size: int, limits: Limits = Limits()) -> dict:
    """Ray Data stage: encoded ``image`` -> uint8 views ``view_0..`` (B, C, h, w) and ``ok`` (False
    for an undecodable image or one past ``limits``).

    Views are augmented in [0, 1] and stored as uint8 (a quarter of float32 in the object
    store); the worker normalises them. Each batch draws fresh random parameters.
    torch and torchvision are imported here (``crop_modules``), not with the module: the tasks that
    only read and decode (``read_pieces``, ``decode_stage``) start without them (seconds less per process).
    """
    torch, MultiCrop = crop_modules()
    torch.set_num_threads(1)
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    images, ok = decode_batch(batch["image"], channels, size, limits)
    crops = MultiCrop(AugmentConfig.model_validate(augment), channels, (0.0,) * channels, (1.0,) * channels)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    views = crops(x, normalize=False)
    out = {f"view_{i}": (v * 255).round_().to(torch.uint8).numpy() for i, v in enumerate(views)}
    return {**out, "ok": ok}


_crop_import_started = False  # this process has begun importing torch for the crop stage


def crop_modules():
    """``torch`` and ``MultiCrop`` for the crop stage, imported on its first batch in a Ray Data task's process.

    Ray cancels the running tasks of a dataset whose execution ends (an elastic resize, a stop). A
    cancel that lands inside this import (seconds of CPU) leaves torch half-registered, and every
    later import in the process fails (``SystemError``, ``duplicate registrations``, ``partially
    initialized module``); Ray would hand that failure to each task it gives the idle process. So a
    process whose import was cut short exits (``os.EX_TEMPFAIL``) instead: Ray runs Ray Data's
    tasks again when their process dies, in a fresh one. A real import error still raises, once.
    """
    global _crop_import_started
    if _crop_import_started and "rayssl.transforms" not in sys.modules:  # an earlier import here did not finish
        os._exit(os.EX_TEMPFAIL)
    _crop_import_started = True
    try:
        import torch

        from rayssl.transforms import MultiCrop
    except KeyboardInterrupt:  # Ray's cancel, inside the import
        os._exit(os.EX_TEMPFAIL)
    return torch, MultiCrop


def stage_bytes_per_row(augment, channels: int) -> int:
    """Bytes of one image's uint8 views (2 global crops and ``augment.local_crops`` local ones)."""
    return channels * (2 * augment.global_crop_size ** 2 + augment.local_crops * augment.local_crop_size ** 2)


def stage_rows(augment, channels: int) -> int:
    """Rows per multi-crop stage call: 512 (faster than 128 rows on Fashion-MNIST; docs/benchmarks.md),
    fewer when the float32 views of one call would pass 32 MiB (17 for 224 px + 6 x 96 px RGB)."""
    return max(16, min(512, 32 * 2**20 // (4 * stage_bytes_per_row(augment, channels))))


def byte_rows(manifest: dict) -> int:
    """Rows per block of encoded images (``data.decode_on=worker``): about 16 MiB, 16 to 4096 rows.
    Ray Data's cost is per block, so larger blocks stream an epoch faster (docs/benchmarks.md,
    [5/5])."""
    mean = manifest["total_bytes"] / max(1, manifest["num_images"])
    return int(min(4096, max(16, 16 * 2**20 // max(1, mean))))


@dataclass(frozen=True)
class DataPlan:
    """The run's data, checked: the sources' URIs and manifests (``eval_*``: the evaluation split,
    ``data.eval_source``; None without it), and what the workers need to know."""

    train_uri: str
    train: dict
    eval_uri: str | None
    eval_manifest: dict | None
    meta: DataMeta


def plan_data(cfg, start_ray=None) -> DataPlan:
    """Find and check the data: manifests read, classes of both splits compared. Raises
    ``StorageError`` (one line naming the field and URI) for a missing bucket, refused
    credentials, an unreachable endpoint or missing shards. Needs no Ray, except to build the
    Fashion-MNIST shards the first time: ``start_ray`` is called just before."""
    d = cfg.data
    train_uri, train, eval_uri, eval_manifest = sources(d, start_ray)
    channels = d.channels or train["channels"]
    common = train.get("image_size")
    size = d.image_size or (min(common) if common else math.ceil(cfg.augment.global_crop_size * 8 / 7))
    labelled = bool(train["classes"]) and eval_manifest is not None and bool(eval_manifest["classes"])
    if labelled and train["classes"] != eval_manifest["classes"]:
        raise ConfigError(f"data.eval_source: classes {eval_manifest['classes'][:3]}... differ from those of "
                          f"data.source {train['classes'][:3]}...")
    num_train = min(train["num_images"], d.train_limit or train["num_images"])
    num_eval = min(eval_manifest["num_images"], d.eval_limit or eval_manifest["num_images"]) if labelled else 0
    meta = DataMeta(num_train=num_train, num_eval=num_eval, channels=channels, image_size=size,
                    classes=tuple(train["classes"]), mean=_adapt(train["mean"], channels),
                    std=_adapt(train["std"], channels))
    return DataPlan(train_uri, train, eval_uri, eval_manifest, meta)


def bank_limit(cfg, meta: DataMeta) -> int:
    """Training images in the final k-NN's bank: ``eval.knn_train_limit``, at most the training set."""
    return min(meta.num_train, cfg.eval.knn_train_limit or meta.num_train)


def online_limits(cfg, meta: DataMeta) -> tuple[int, int] | None:
    """``(bank, queries)`` sizes of the online k-NN points' sets (``eval.online_train_limit`` /
    ``online_eval_limit``), or None: no ``eval.every_epochs``, no labelled evaluation split, or limits
    that cut neither set, so the online points read the final k-NN's sets (two datasets fewer to start)."""
    e = cfg.eval
    if not e.every_epochs or meta.num_eval == 0:
        return None
    bank = bank_limit(cfg, meta)
    online = (min(bank, e.online_train_limit), min(meta.num_eval, e.online_eval_limit))
    return online if online != (bank, meta.num_eval) else None


def build_datasets(cfg, plan: DataPlan) -> dict[str, ray.data.Dataset]:
    """Ray Data datasets of a checked plan: ``train`` plus, when both splits are labelled,
    ``knn_bank`` and ``eval`` (the evaluation split), and with ``eval.every_epochs`` the online
    k-NN points' ``online_bank`` and ``online_eval`` (their first rows, where ``online_limits``
    cuts the sets); without them (no k-NN), with ``eval.gallery_clusters``, ``gallery`` (the first
    ``eval.gallery_images`` of the evaluation split, else of the training data)."""
    d, meta, cpus = cfg.data, plan.meta, cfg.data_cpus  # every task in the workers' CPU units
    limits = Limits.of(d)  # data.max_image_pixels, data.max_item_bytes: past them an image is not ok
    crop = {"augment": cfg.augment.model_dump(), "channels": meta.channels, "size": meta.image_size,
            "limits": limits}
    # One execution for the run's epochs when it streams encoded bytes. An epoch per execution with
    # data.deterministic (one seeded file order; the local shuffle varies per epoch) and when Ray Data
    # crops: nothing would bound how many epochs of views it cropped ahead (docs/benchmarks.md, [5/5]).
    epochs = 1 if d.deterministic or d.decode_on == "data" else math.ceil(cfg.train.epochs)
    seed = cfg.train.seed if d.deterministic else None
    if d.decode_on == "data":
        rows = stage_rows(cfg.augment, meta.channels)
        stream = train_stream(plan.train_uri, plan.train, d, rows, epochs, seed, multicrop_stage, crop, cpus)
        # One block per stage call, not one per task: each shard's task would otherwise glue its
        # crops into one block (up to 128 MiB), and the equal split of the workers waits for blocks.
        stream.context.target_max_block_size = rows * stage_bytes_per_row(cfg.augment, meta.channels)
    else:
        stream = train_stream(plan.train_uri, plan.train, d, byte_rows(plan.train), epochs, seed, cpus=cpus)
    datasets, sets = {"train": stream}, {}
    if meta.num_eval > 0:
        sets = {"knn_bank": (plan.train_uri, plan.train, bank_limit(cfg, meta)),
                "eval": (plan.eval_uri, plan.eval_manifest, d.eval_limit)}
        if online := online_limits(cfg, meta):  # the online k-NN points' smaller sets
            sets.update(online_bank=(plan.train_uri, plan.train, online[0]),
                        online_eval=(plan.eval_uri, plan.eval_manifest, online[1]))
    elif cfg.eval.gallery_clusters:  # no k-NN: the end-of-run gallery's own images (rayssl.train.gallery)
        most = cfg.eval.gallery_images
        sets = {"gallery": (plan.eval_uri, plan.eval_manifest, min(most, d.eval_limit or most)) if plan.eval_manifest
                else (plan.train_uri, plan.train, min(most, meta.num_train))}
    for name, (uri, manifest, limit) in sets.items():  # ``id``: the end-of-run gallery finds its images again
        datasets[name] = read(uri, manifest, d, ["id", "image", "label"], limit, cpus).map_batches(
            decode_stage, fn_kwargs={"channels": meta.channels, "size": meta.image_size, "limits": limits},
            batch_format="numpy", batch_size=512, num_cpus=cpus)
    return datasets
