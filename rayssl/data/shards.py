"""Parquet image shards + ``manifest.json`` from an image folder, MNIST-family IDX files or a listing.

The driver lists and sizes the inputs (``rayssl.data.sources``) and packs them, in sorted order,
into shards of about ``target_shard_mb`` input bytes (at least ``min_shards``); one Ray Data task
per shard reads, checks (``images.check``) and writes ``shard-NNNNN.parquet`` with the columns
``COLUMNS`` (``rayssl.data.shard_writer``). Bad inputs are skipped or converted, and listed with a
reason in the manifest (``rayssl.data.manifest``), which is written last. Inputs are untrusted:
each is bounded in bytes and pixels (``images.Limits``), and a listing's rows stay inside its folder
unless ``allow_outside_root``.

This module is the entry point: ``make_shards``, ``load_manifest`` and the names of the
modules above that callers use (``COLUMNS``, ``MANIFEST``, ``row_id``, ...) are importable here.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import time
from typing import Callable

import pyarrow.fs

from rayssl.config import ConfigError
from rayssl.data import images, storage
from rayssl.data.manifest import (FORMAT_VERSION, MANIFEST, build_manifest, fingerprint, load_manifest,
                                  reuse_or_clear, write_json)
from rayssl.data.shard_writer import COLUMNS, ShardJob, row_id, write_shard
from rayssl.data.sources import IDX_FILES, Inputs, scan
from rayssl.data.storage import S3Options

__all__ = ["COLUMNS", "FORMAT_VERSION", "IDX_FILES", "MANIFEST", "Inputs", "ShardJob", "build_manifest",
           "check_locations", "fingerprint", "load_manifest", "make_shards", "pack", "plan", "row_id",
           "scan", "shard_name", "write_shard"]

_SHARD_NAME = re.compile(r"shard-\d{5}\.parquet")


def check_locations(source: str, destination: str, s3: S3Options | None = None) -> None:
    """Raise ``StorageError`` unless ``source`` can be read and ``destination`` written."""
    storage.check_readable(source, s3)
    storage.check_writable(destination, s3)


def pack(sizes: list[int], target_bytes: float, min_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` ranges of about ``target_bytes`` each, at least ``min(min_shards, n)``."""
    n = len(sizes)
    weights = [max(s, 1) for s in sizes]
    total = sum(weights)
    k = max(1, min(n, max(math.ceil(total / target_bytes), min_shards)))
    cuts, acc = [0], 0
    for i, w in enumerate(weights[:-1]):
        acc += w
        still_needed = k - len(cuts)
        if still_needed > 0 and (acc >= len(cuts) * total / k or n - (i + 1) == still_needed):
            cuts.append(i + 1)
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:]))


def shard_name(index: int) -> str:
    """The file name of shard ``index``."""
    return f"shard-{index:05d}.parquet"


def plan(inputs: Inputs, target_shard_mb: float, min_shards: int) -> list[dict]:
    """One plan per shard: its index, file name and inputs (or IDX row range)."""
    ranges = pack([it["size"] for it in inputs.items], target_shard_mb * 2**20, min_shards)
    plans = []
    for index, (start, stop) in enumerate(ranges):
        p = {"index": index, "path": shard_name(index)}
        if inputs.kind == "idx":
            p["idx"] = {**inputs.idx, "start": start, "stop": stop}
        else:
            p["items"] = inputs.items[start:stop]
        plans.append(p)
    return plans


def _task(row: dict, job: ShardJob) -> dict:
    """Ray Data ``map`` adapter: a JSON plan in, JSON stats out (no Arrow type guessing)."""
    return {"stats": json.dumps(write_shard(json.loads(row["plan"]), job))}


def _run(plans: list[dict], job: ShardJob, progress: Callable[[str], None]) -> list[dict]:
    """Write every shard in its own Ray Data task; shard stats in shard order."""
    import ray.data  # here only: planning, manifests and ``load_manifest`` need no Ray

    rows = [{"plan": json.dumps(p)} for p in plans]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(_task, fn_kwargs={"job": job})
    done, count, start = [], 0, time.monotonic()
    for row in ds.iter_rows():
        done.append(json.loads(row["stats"]))
        count += done[-1]["num_images"]
        rate = count / max(time.monotonic() - start, 1e-6)
        progress(f"[make_shards] {len(done)}/{len(plans)} shards, {count} images, {rate:.0f} img/s")
    return sorted(done, key=lambda s: s["index"])


def _delete_stale(fs: pyarrow.fs.FileSystem, dest: str, keep: set[str]) -> list[str]:
    """Delete ``shard-*.parquet`` files in ``dest`` that are not in ``keep``; their names."""
    stale = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(dest, allow_not_found=True))
             if _SHARD_NAME.fullmatch(posixpath.basename(i.path)) and posixpath.basename(i.path) not in keep]
    for path in stale:
        fs.delete_file(path)
    return [posixpath.basename(p) for p in stale]


def _check_options(split: str, target_shard_mb: float, min_shards: int, reencode: str | None,
                   limits: images.Limits) -> None:
    """Raise ``ConfigError`` naming the first invalid option."""
    if split not in IDX_FILES:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(IDX_FILES)}")
    if not target_shard_mb > 0:
        raise ConfigError(f"target_shard_mb: must be > 0 (got {target_shard_mb})")
    if min_shards < 1:
        raise ConfigError(f"min_shards: must be >= 1 (got {min_shards})")
    if reencode is not None and reencode not in images.REENCODE:
        raise ConfigError(f"reencode: {reencode!r} is not one of {', '.join(images.REENCODE)}")
    for name, value in (("max_image_pixels", limits.max_pixels), ("max_item_bytes", limits.max_bytes)):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1 (got {value})")


def make_shards(source: str, destination: str, *, split: str = "train", target_shard_mb: float = 64.0,
                min_shards: int = 8, reencode: str | None = None, class_names: list[str] | None = None,
                s3: S3Options | None = None, force: bool = False, progress: Callable[[str], None] = print,
                start_ray: Callable[[], None] | None = None, limits: images.Limits = images.Limits(),
                allow_outside_root: bool = False) -> dict:
    """Convert ``source`` into Parquet shards + ``manifest.json`` under ``destination``; the manifest.

    Every input is held to ``limits`` (bytes read, pixels decoded) and a listing's rows to the
    listing's folder unless ``allow_outside_root``; the others are skipped with their reason.

    Does nothing (returns the existing manifest) when ``destination`` already holds shards of
    the same source and options, unless ``force``. Raises ``StorageError`` / ``ConfigError``
    (one line naming the URI or option) before any work for unusable locations or options.
    ``start_ray`` is called only when shards are to be written (Ray Data tasks write them), so
    a caller's checks and its own Ray settings come first; without it Ray Data starts a default
    local Ray.
    """
    _check_options(split, target_shard_mb, min_shards, reencode, limits)
    s3 = s3 or S3Options()
    check_locations(source, destination, s3)
    inputs = scan(source, split, class_names, s3, allow_outside_root)
    options = {"reencode": reencode, "target_shard_mb": target_shard_mb, "min_shards": min_shards,
               "max_image_pixels": limits.max_pixels, "max_item_bytes": limits.max_bytes,
               "allow_outside_root": allow_outside_root}
    source_fingerprint = fingerprint(source, inputs, {**options, "split": split, "class_names": class_names})
    fs, dest = storage.resolve(destination, s3)
    try:
        if (manifest := reuse_or_clear(fs, dest, destination, source_fingerprint, force, progress)) is not None:
            return manifest
        plans = plan(inputs, target_shard_mb, min_shards)
        if start_ray is not None:
            start_ray()
        ignored = f", {inputs.ignored} non-image files ignored" if inputs.ignored else ""
        progress(f"[make_shards] {source}: {len(inputs.items)} inputs ({inputs.kind}), {len(inputs.classes)} "
                 f"classes{ignored} -> {len(plans)} shards in {destination}")
        job = ShardJob(fs, dest, reencode, inputs.classes, s3, limits)
        manifest = build_manifest(source, split, options, source_fingerprint, inputs, _run(plans, job, progress))
        write_json(fs, f"{dest}/{MANIFEST}", manifest)
        removed = _delete_stale(fs, dest, {p["path"] for p in plans})
    except OSError as err:
        raise storage.explain(destination, err, s3) from None
    if removed:
        progress(f"[make_shards] removed {len(removed)} stale shards: {', '.join(removed)}")
    return manifest

