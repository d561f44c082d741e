"""Parquet image shards + ``manifest.json`` from an image folder, MNIST-family IDX files or a listing.

Sources (auto-detected):

* a folder (local or ``s3://``) of images, searched recursively for ``images.EXTENSIONS``; when no
  image sits at its root, the top-level sub-folder names are the classes (sorted -> label 0..C-1);
* a folder with ``train-images-idx3-ubyte[.gz]`` / ``t10k-...`` IDX files (``split`` picks one);
  pixels are stored as PNG;
* a ``.parquet`` / ``.csv`` listing with a ``uri`` (or ``path``) column, optional ``label`` (int) and
  ``label_name``; relative paths are relative to the listing's folder.

The driver lists and sizes the inputs and packs them, in sorted order, into shards of about
``target_shard_mb`` input bytes (at least ``min_shards``); one Ray Data task per shard reads,
checks (``images.check``) and writes ``shard-NNNNN.parquet`` with the columns ``COLUMNS``. Bad
inputs are skipped or converted, and listed with a reason in the manifest, which is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.fs
import pyarrow.parquet as pq
import ray.data
from PIL import Image

from rayssl.config import ConfigError
from rayssl.data import images, storage
from rayssl.data.fashion_mnist import CLASSES as FASHION_CLASSES
from rayssl.data.fashion_mnist import read_idx
from rayssl.data.storage import S3Options, StorageError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
COLUMNS = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                     ("label_name", pa.string()), ("source", pa.string()), ("width", pa.int32()),
                     ("height", pa.int32())])
ROW_GROUP = 1000            # rows per Parquet row group ...
ROW_GROUP_BYTES = 64 * 2**20  # ... or fewer when their images pass this size
STATS_SIZE = 64  # at most this size (a centre square) for the mean / std
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_SHARD_NAME = re.compile(r"shard-\d{5}\.parquet")


@dataclass
class Inputs:
    """What the driver found in a source, in sorted source order."""

    kind: str                 # "folder", "idx" or "listing"
    items: list[dict]         # folder/listing: {key, uri, size, label, label_name}; idx: one per image
    classes: list[str]
    stamp: list[tuple]        # (key, size, mtime) entries for the source fingerprint
    idx: dict | None = None   # idx: {images, labels} URIs
    skipped: list[dict] = field(default_factory=list)  # rejected while listing (duplicates)
    ignored: int = 0          # files without an image extension


@dataclass(frozen=True)
class _Job:
    """What every shard task needs besides its plan."""

    dest_fs: pyarrow.fs.FileSystem
    dest: str
    reencode: str | None
    classes: list[str]
    s3: S3Options


# ---------------------------------------------------------------- listing the source (driver)


def check_locations(source: str, destination: str, s3: S3Options | None = None) -> None:
    """Raise ``StorageError`` unless ``source`` can be read and ``destination`` written."""
    storage.check_readable(source, s3)
    storage.check_writable(destination, s3)


def scan(source: str, split: str = "train", class_names: list[str] | None = None,
         s3: S3Options | None = None) -> Inputs:
    """Detect the kind of ``source`` and list its inputs with sizes and labels."""
    fs, path = storage.resolve(source, s3)
    try:
        info = fs.get_file_info(path)
        if info.type == pyarrow.fs.FileType.File:
            if path.lower().endswith((".parquet", ".csv")):
                return _scan_listing(source, fs, path, info, class_names, s3)
            raise ConfigError(f"{source}: not a folder, nor a .parquet or .csv listing")
        names = {posixpath.basename(i.path) for i in fs.get_file_info(pyarrow.fs.FileSelector(path))}
        if any(n.startswith(stems[0]) for stems in IDX_FILES.values() for n in names):
            return _scan_idx(source, fs, path, names, split, class_names, s3)
        if class_names:
            raise ConfigError("class_names: only for IDX or listing sources; folder classes are sub-folder names")
        return _scan_folder(source, fs, path)
    except OSError as err:
        raise storage.explain(source, err, s3) from None


def _walk_local(root: str) -> Iterator[tuple[str, str, int, int]]:
    """``(relative path, path, size, mtime_ns)`` of local files; symlinks followed, loops cut.

    A dangling or unreadable link is listed with size 0 so that it is reported, not lost.
    """
    seen = {os.path.realpath(root)}
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in seen)
        seen.update(os.path.realpath(os.path.join(folder, d)) for d in dirs)
        for name in files:
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = 0, os.lstat(full).st_mtime_ns
            yield os.path.relpath(full, root).replace(os.sep, "/"), full, size, mtime


def _walk(fs: pyarrow.fs.FileSystem, root: str) -> Iterator[tuple[str, str, int, int]]:
    """``(relative path, URI, size, mtime)`` of every file under ``root``."""
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        yield from _walk_local(root)
        return
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        if info.type == pyarrow.fs.FileType.File:
            yield (info.path[len(root) + 1:], f"s3://{info.path}", info.size or 0,
                   info.mtime_ns or 0)


def _scan_folder(source: str, fs: pyarrow.fs.FileSystem, root: str) -> Inputs:
    """Image files under ``root``; labelled by top-level sub-folder when none sits at the root."""
    found = sorted(_walk(fs, root))
    files = [f for f in found if f[0].lower().endswith(images.EXTENSIONS)]
    if not files:
        raise ConfigError(f"{source}: no images ({', '.join(images.EXTENSIONS)}) found")
    labelled = all("/" in rel for rel, *_ in files)
    classes = sorted({rel.split("/", 1)[0] for rel, *_ in files}) if labelled else []
    items = []
    for rel, uri, size, _ in files:
        name = rel.split("/", 1)[0] if labelled else None
        items.append({"key": rel, "uri": uri, "size": size, "label_name": name,
                      "label": classes.index(name) if labelled else None})
    stamp = [(rel, size, mtime) for rel, _, size, mtime in files]
    return Inputs("folder", items, classes, stamp, ignored=len(found) - len(files))


def _load_idx(uri: str, s3: S3Options | None) -> np.ndarray:
    """``read_idx`` of a local or ``s3://`` IDX file (the latter through a temporary copy)."""
    fs, path = storage.resolve(uri, s3)
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return read_idx(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        pyarrow.fs.copy_files(path, local, source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return read_idx(local)


def _scan_idx(source: str, fs: pyarrow.fs.FileSystem, root: str, names: set[str], split: str,
              class_names: list[str] | None, s3: S3Options | None) -> Inputs:
    """The ``split`` pair of IDX files in ``root``: one input per image."""
    uris, stamp = [], []
    for stem in IDX_FILES[split]:
        name = next((n for n in (stem + ".gz", stem) if n in names), None)
        if name is None:
            raise StorageError(f"{source}: no {stem}[.gz] for split {split!r}")
        info = fs.get_file_info(f"{root}/{name}")
        uris.append(f"{source.rstrip('/')}/{name}")
        stamp.append((name, info.size, info.mtime_ns or 0))
    try:
        pixels, labels = (_load_idx(u, s3) for u in uris)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if pixels.ndim != 3 or pixels.dtype != np.uint8 or len(pixels) != len(labels):
        raise ConfigError(f"{uris[0]}: expected uint8 images (N, H, W) matching the {len(labels)} labels, "
                          f"got {pixels.dtype} {pixels.shape}")
    default = FASHION_CLASSES if "fashion" in posixpath.basename(root).lower() else [str(i) for i in range(10)]
    classes = list(class_names or default)
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
        raise ConfigError(f"class_names: {len(classes)} names but labels range {labels.min()}..{labels.max()}")
    row_bytes = pixels.shape[1] * pixels.shape[2]
    name = posixpath.basename(uris[0])
    items = [{"key": f"{name}#{i}", "size": row_bytes} for i in range(len(pixels))]
    return Inputs("idx", items, classes, stamp, idx={"images": uris[0], "labels": uris[1]})


def _read_listing(source: str, fs: pyarrow.fs.FileSystem, path: str) -> pa.Table:
    """The listing table (Parquet or CSV); ``ConfigError`` when it cannot be parsed."""
    try:
        if path.lower().endswith(".parquet"):
            return pq.read_table(path, filesystem=fs)
        with fs.open_input_stream(path) as f:
            return pyarrow.csv.read_csv(f)
    except pa.ArrowInvalid as err:
        raise ConfigError(f"{source}: cannot read the listing: {err}".splitlines()[0]) from None


def _listing_classes(source: str, labels: list, names: list, class_names: list[str] | None
                     ) -> tuple[list, list, list[str]]:
    """``(labels, label_names, classes)`` of a listing: integer labels and/or names."""
    if any(v is not None for v in labels):
        if any(v is not None and v < 0 for v in labels):
            raise ConfigError(f"{source}: label must be >= 0")
        top = max(v for v in labels if v is not None)
        mapping: dict[int, str] = {}
        for label, name in zip(labels, names):
            if label is not None and name is not None and mapping.setdefault(label, name) != name:
                raise ConfigError(f"{source}: label {label} has two label_name values "
                                  f"{mapping[label]!r} and {name!r}")
        classes = list(class_names or [mapping.get(i, str(i)) for i in range(top + 1)])
        if top >= len(classes):
            raise ConfigError(f"class_names: {len(classes)} names but labels go up to {top}")
        return labels, [None if v is None else classes[v] for v in labels], classes
    if class_names:
        raise ConfigError(f"class_names: {source} has no integer label column to name")
    classes = sorted({n for n in names if n is not None})
    return [None if n is None else classes.index(n) for n in names], names, classes


def _stat(uris: list[str], s3_options: S3Options | None) -> list[tuple[int, int]]:
    """``(size, mtime)`` of local paths and ``s3://`` URIs, ``(0, 0)`` for missing ones."""
    out = [(0, 0)] * len(uris)
    for s3 in (False, True):
        group = [i for i, uri in enumerate(uris) if storage.is_s3(uri) == s3]
        if group:
            fs = storage.resolve(uris[group[0]], s3_options)[0]
            for i, info in zip(group, fs.get_file_info([uris[i].removeprefix("s3://") for i in group])):
                if info.type == pyarrow.fs.FileType.File:
                    out[i] = (info.size, info.mtime_ns or 0)
    return out


def _scan_listing(source: str, fs: pyarrow.fs.FileSystem, path: str, info: pyarrow.fs.FileInfo,
                  class_names: list[str] | None, s3: S3Options | None) -> Inputs:
    """Inputs named by a listing, relative paths under the listing's folder; duplicates skipped."""
    table = _read_listing(source, fs, path)
    column = next((c for c in ("uri", "path") if c in table.column_names), None)
    if column is None:
        raise ConfigError(f"{source}: a listing needs a 'uri' or 'path' column (has {', '.join(table.column_names)})")
    if table[column].null_count:
        raise ConfigError(f"{source}: column {column} has {table[column].null_count} empty values")
    if "label" in table.column_names and not (pa.types.is_integer(table["label"].type)
                                              or pa.types.is_null(table["label"].type)):
        raise ConfigError(f"{source}: column label must hold integers (is {table['label'].type})")
    n = table.num_rows
    if n == 0:
        raise ConfigError(f"{source}: the listing names no images")
    keys = [str(v) for v in table[column].to_pylist()]
    labels = table["label"].to_pylist() if "label" in table.column_names else [None] * n
    names = table["label_name"].cast(pa.string()).to_pylist() if "label_name" in table.column_names else [None] * n
    labels, names, classes = _listing_classes(source, labels, names, class_names)
    folder = posixpath.dirname(path)
    items, skipped = [], []
    for key, label, name in sorted(zip(keys, labels, names), key=lambda r: r[0]):
        if items and items[-1]["key"] == key:
            skipped.append({"source": key, "reason": "duplicate listing row"})
            continue
        if storage.is_s3(key) or os.path.isabs(key):
            uri = key
        else:
            uri = f"s3://{folder}/{key}" if storage.is_s3(source) else os.path.join(folder, key)
        items.append({"key": key, "uri": uri, "size": 0, "label": label, "label_name": name})
    stamp = [(source, info.size, info.mtime_ns or 0)]
    for item, (size, mtime) in zip(items, _stat([it["uri"] for it in items], s3)):
        item["size"] = size
        stamp.append((item["key"], size, mtime))
    return Inputs("listing", items, classes, stamp, skipped=skipped)


# ---------------------------------------------------------------- planning (driver)


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


def fingerprint(source: str, inputs: Inputs, options: dict) -> str:
    """sha256 over the source, its sorted (key, size, mtime) entries and the options."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, source, options], sort_keys=True).encode())
    for entry in sorted(inputs.stamp):
        h.update(json.dumps(entry).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- one shard (Ray Data task)


def _file_bytes(items: list[dict], s3_options: S3Options | None) -> Iterator[tuple[dict, bytes | str]]:
    """``(item, bytes)`` per input, or ``(item, reason)`` when it cannot be read."""
    filesystems: dict[bool, pyarrow.fs.FileSystem] = {}
    for item in items:
        s3 = storage.is_s3(item["uri"])
        try:
            if s3 not in filesystems:
                filesystems[s3] = storage.resolve(item["uri"], s3_options)[0]
            with filesystems[s3].open_input_stream(item["uri"].removeprefix("s3://")) as f:
                yield item, f.read()
        except OSError as err:
            yield item, f"unreadable: {err}".splitlines()[0]


def _idx_bytes(spec: dict, classes: list[str], s3: S3Options | None) -> Iterator[tuple[dict, bytes]]:
    """``(item, PNG bytes)`` for the rows ``spec['start']:spec['stop']`` of an IDX pair."""
    pixels = _load_idx(spec["images"], s3)
    labels = _load_idx(spec["labels"], s3)
    name = posixpath.basename(spec["images"])
    for i in range(spec["start"], spec["stop"]):
        buf = io.BytesIO()
        Image.fromarray(pixels[i], "L").save(buf, "PNG")
        label = int(labels[i])
        yield ({"key": f"{name}#{i}", "uri": f"{spec['images']}#{i}", "label": label,
                "label_name": classes[label]}, buf.getvalue())


class _ShardStats:
    """Counts, content hash and pixel statistics of the rows of one shard."""

    def __init__(self, index: int, num_classes: int) -> None:
        self.index = index
        self.num_images = 0
        self.class_counts = [0] * num_classes
        self.hash = hashlib.sha256()
        self.sums = np.zeros(3)
        self.sumsq = np.zeros(3)
        self.pixels = 0
        self.gray = True
        self.sizes: set[tuple[int, int]] = set()
        self.skipped: list[dict] = []
        self.converted: list[dict] = []

    def add(self, row_id: str, image: images.CheckedImage, label: int | None) -> None:
        """Account one kept image."""
        self.num_images += 1
        if label is not None:
            self.class_counts[label] += 1
        self.hash.update(row_id.encode())
        self.hash.update(hashlib.sha256(image.data).digest())
        size = min(STATS_SIZE, image.width, image.height)  # never upsample: it would shrink the std
        thumb = images.decode(image.data, 3, size).reshape(-1, 3) / 255.0
        self.sums += thumb.sum(0)
        self.sumsq += (thumb ** 2).sum(0)
        self.pixels += len(thumb)
        with Image.open(io.BytesIO(image.data)) as im:
            self.gray &= im.mode == "L"
        if len(self.sizes) < 2:
            self.sizes.add((image.width, image.height))

    def to_dict(self, path: str, nbytes: int) -> dict:
        """JSON-ready stats of the shard written to ``path`` (``nbytes`` on storage)."""
        return {"index": self.index, "path": path, "num_images": self.num_images, "bytes": nbytes,
                "sha256": self.hash.hexdigest(), "class_counts": self.class_counts,
                "sums": self.sums.tolist(), "sumsq": self.sumsq.tolist(), "pixels": self.pixels,
                "gray": self.gray, "sizes": sorted(self.sizes), "skipped": self.skipped,
                "converted": self.converted}


def row_id(key: str) -> str:
    """The stable id of an input: 16 hex chars of sha1 of its source key."""
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def write_shard(shard: dict, job: _Job) -> dict:
    """Read, check and write the inputs of one shard plan; its stats (counts, hash, pixels, issues)."""
    if "idx" in shard:
        inputs = _idx_bytes(shard["idx"], job.classes, job.s3)
    else:
        inputs = _file_bytes(shard["items"], job.s3)
    stats = _ShardStats(shard["index"], len(job.classes))
    path = f"{job.dest}/{shard['path']}"
    rows: dict[str, list] = {name: [] for name in COLUMNS.names}
    buffered = 0
    with pq.ParquetWriter(path, COLUMNS, filesystem=job.dest_fs) as writer:
        for item, data in inputs:
            if isinstance(data, str):
                stats.skipped.append({"source": item["uri"], "reason": data})
                continue
            try:
                image = images.check(data, job.reencode)
            except images.BadImage as err:
                stats.skipped.append({"source": item["uri"], "reason": str(err)})
                continue
            if image.converted:
                stats.converted.append({"source": item["uri"], "reason": image.converted})
            rid, label = row_id(item["key"]), item["label"]
            stats.add(rid, image, label)
            for name, value in zip(COLUMNS.names, (rid, image.data, label, item["label_name"],
                                                   item["uri"], image.width, image.height)):
                rows[name].append(value)
            buffered += len(image.data)
            if len(rows["id"]) >= ROW_GROUP or buffered >= ROW_GROUP_BYTES:
                writer.write_table(pa.table(rows, schema=COLUMNS))
                rows, buffered = {name: [] for name in COLUMNS.names}, 0
        if rows["id"]:
            writer.write_table(pa.table(rows, schema=COLUMNS))
    return stats.to_dict(shard["path"], job.dest_fs.get_file_info(path).size)


def _task(row: dict, job: _Job) -> dict:
    """Ray Data ``map`` adapter: a JSON plan in, JSON stats out (no Arrow type guessing)."""
    return {"stats": json.dumps(write_shard(json.loads(row["plan"]), job))}


# ---------------------------------------------------------------- driver: run, manifest, idempotency


def _run(plans: list[dict], job: _Job, progress: Callable[[str], None]) -> list[dict]:
    """Write every shard in its own Ray Data task; shard stats in shard order."""
    rows = [{"plan": json.dumps(p)} for p in plans]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(_task, fn_kwargs={"job": job})
    done, count, start = [], 0, time.monotonic()
    for row in ds.iter_rows():
        done.append(json.loads(row["stats"]))
        count += done[-1]["num_images"]
        rate = count / max(time.monotonic() - start, 1e-6)
        progress(f"[make_shards] {len(done)}/{len(plans)} shards, {count} images, {rate:.0f} img/s")
    return sorted(done, key=lambda s: s["index"])


def _sha256(parts: list[str]) -> str:
    """sha256 hex digest over ``parts`` in order."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
    return h.hexdigest()


def build_manifest(source: str, split: str, options: dict, source_fingerprint: str, inputs: Inputs,
                   shards: list[dict]) -> dict:
    """The manifest from the inputs and the per-shard stats (in shard order)."""
    num_images = sum(s["num_images"] for s in shards)
    skipped = inputs.skipped + [x for s in shards for x in s["skipped"]]
    converted = [x for s in shards for x in s["converted"]]
    if num_images == 0:
        first = f" (e.g. {skipped[0]['source']}: {skipped[0]['reason']})" if skipped else ""
        raise ConfigError(f"{source}: none of the {len(skipped)} inputs is a readable image{first}")
    channels = 1 if all(s["gray"] for s in shards) else 3
    pixels = sum(s["pixels"] for s in shards)
    mean = np.sum([s["sums"] for s in shards], axis=0) / pixels
    std = np.sqrt(np.maximum(np.sum([s["sumsq"] for s in shards], axis=0) / pixels - mean ** 2, 0))
    if channels == 1:
        mean, std = mean[:1], std[:1]
    sizes = {tuple(size) for s in shards for size in s["sizes"]}
    return {
        "format_version": FORMAT_VERSION, "source": source, "split": split, "options": options,
        "source_fingerprint": source_fingerprint, "num_images": num_images,
        "num_skipped": len(skipped), "num_converted": len(converted), "classes": inputs.classes,
        "class_counts": np.sum([s["class_counts"] for s in shards], axis=0, dtype=np.int64).tolist()
        if inputs.classes else [],
        "channels": channels, "image_size": list(sizes.pop()) if len(sizes) == 1 else None,
        "mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std],
        "shards": [{k: s[k] for k in ("path", "num_images", "bytes", "sha256")} for s in shards],
        "total_bytes": sum(s["bytes"] for s in shards),
        "content_hash": _sha256([s["sha256"] for s in shards]),
        "skipped": skipped, "converted": converted,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict:
    """Parse the JSON file at ``path``."""
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_json(fs: pyarrow.fs.FileSystem, path: str, value: dict) -> None:
    """Write ``value`` whole or not at all: an S3 object appears on close; a local file is renamed."""
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    with fs.open_output_stream(path + ".tmp" if local else path) as f:
        f.write(json.dumps(value, indent=1).encode())
    if local:
        fs.move(path + ".tmp", path)


def _up_to_date(fs: pyarrow.fs.FileSystem, dest: str, source_fingerprint: str) -> dict | None:
    """The existing manifest when it matches ``source_fingerprint`` and all its shards exist."""
    try:
        manifest = _read_json(fs, f"{dest}/{MANIFEST}")
    except (FileNotFoundError, ValueError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("source_fingerprint") != source_fingerprint:
        return None
    infos = fs.get_file_info([f"{dest}/{s['path']}" for s in manifest["shards"]])
    return manifest if all(i.type == pyarrow.fs.FileType.File for i in infos) else None


def _delete_stale(fs: pyarrow.fs.FileSystem, dest: str, keep: set[str]) -> list[str]:
    """Delete ``shard-*.parquet`` files in ``dest`` that are not in ``keep``; their names."""
    stale = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(dest, allow_not_found=True))
             if _SHARD_NAME.fullmatch(posixpath.basename(i.path)) and posixpath.basename(i.path) not in keep]
    for path in stale:
        fs.delete_file(path)
    return [posixpath.basename(p) for p in stale]


def _check_options(split: str, target_shard_mb: float, min_shards: int, reencode: str | None) -> None:
    """Raise ``ConfigError`` naming the first invalid option."""
    if split not in IDX_FILES:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(IDX_FILES)}")
    if not target_shard_mb > 0:
        raise ConfigError(f"target_shard_mb: must be > 0 (got {target_shard_mb})")
    if min_shards < 1:
        raise ConfigError(f"min_shards: must be >= 1 (got {min_shards})")
    if reencode is not None and reencode not in images.REENCODE:
        raise ConfigError(f"reencode: {reencode!r} is not one of {', '.join(images.REENCODE)}")


def make_shards(source: str, destination: str, *, split: str = "train", target_shard_mb: float = 64.0,
                min_shards: int = 8, reencode: str | None = None, class_names: list[str] | None = None,
                s3: S3Options | None = None, force: bool = False, progress: Callable[[str], None] = print) -> dict:
    """Convert ``source`` into Parquet shards + ``manifest.json`` under ``destination``; the manifest.

    Does nothing (returns the existing manifest) when ``destination`` already holds shards of
    the same source and options, unless ``force``. Raises ``StorageError`` / ``ConfigError``
    (one line naming the URI or option) before any work for unusable locations or options.
    """
    _check_options(split, target_shard_mb, min_shards, reencode)
    s3 = s3 or S3Options()
    check_locations(source, destination, s3)
    inputs = scan(source, split, class_names, s3)
    options = {"reencode": reencode, "target_shard_mb": target_shard_mb, "min_shards": min_shards}
    source_fingerprint = fingerprint(source, inputs, {**options, "split": split, "class_names": class_names})
    fs, dest = storage.resolve(destination, s3)
    try:
        if not force and (manifest := _up_to_date(fs, dest, source_fingerprint)) is not None:
            progress(f"[make_shards] {destination}: up to date ({manifest['num_images']} images, "
                     f"{len(manifest['shards'])} shards)")
            return manifest
        # The old manifest must never point at shards that are being rewritten.
        if fs.get_file_info(f"{dest}/{MANIFEST}").type == pyarrow.fs.FileType.File:
            fs.delete_file(f"{dest}/{MANIFEST}")
        plans = plan(inputs, target_shard_mb, min_shards)
        ignored = f", {inputs.ignored} non-image files ignored" if inputs.ignored else ""
        progress(f"[make_shards] {source}: {len(inputs.items)} inputs ({inputs.kind}), {len(inputs.classes)} "
                 f"classes{ignored} -> {len(plans)} shards in {destination}")
        job = _Job(fs, dest, reencode, inputs.classes, s3)
        manifest = build_manifest(source, split, options, source_fingerprint, inputs, _run(plans, job, progress))
        _write_json(fs, f"{dest}/{MANIFEST}", manifest)
        removed = _delete_stale(fs, dest, {p["path"] for p in plans})
    except OSError as err:
        raise storage.explain(destination, err, s3) from None
    if removed:
        progress(f"[make_shards] removed {len(removed)} stale shards: {', '.join(removed)}")
    return manifest


def load_manifest(uri: str, s3: S3Options | None = None) -> dict:
    """The ``manifest.json`` of the shards at ``uri``; ``StorageError`` (one line) when missing."""
    fs, root = storage.resolve(uri, s3)
    try:
        if storage.is_s3(uri) and fs.get_file_info(root.split("/", 1)[0]).type == pyarrow.fs.FileType.NotFound:
            raise StorageError(f"{uri}: bucket does not exist")
        manifest = _read_json(fs, f"{root}/{MANIFEST}")
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{uri}: no {MANIFEST}; build shards with jobs/make_shards.py") from None
    except OSError as err:
        raise storage.explain(uri, err, s3) from None
    except ValueError as err:
        raise StorageError(f"{uri}/{MANIFEST}: not valid JSON ({err})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StorageError(f"{uri}/{MANIFEST}: format_version {manifest.get('format_version')!r}, expected "
                           f"{FORMAT_VERSION}; rebuild with jobs/make_shards.py --force")
    return manifest
