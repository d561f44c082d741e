"""What a shard source holds: the driver's listing of its inputs, sizes and labels.

Sources (auto-detected by ``scan``):

* a folder (local or ``s3://``) of images, searched recursively for ``images.EXTENSIONS``; when no
  image sits at its root, the top-level sub-folder names are the classes (sorted -> label 0..C-1);
* a folder with ``train-images-idx3-ubyte[.gz]`` / ``t10k-...`` IDX files (``split`` picks one);
  pixels are stored as PNG;
* a ``.parquet`` / ``.csv`` listing with a ``uri`` (or ``path``) column, optional ``label`` (int) and
  ``label_name``; relative paths are relative to the listing's folder. A listing is untrusted: a row
  whose path leaves that folder (``..``, an absolute path or an ``s3://`` URI elsewhere, another
  bucket) is skipped with a reason naming the listing and its line, unless ``allow_outside_root``.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.fs
import pyarrow.parquet as pq

from rayssl.config import ConfigError
from rayssl.data import images, storage
from rayssl.data.fashion_mnist import CLASSES as FASHION_CLASSES
from rayssl.data.fashion_mnist import read_idx
from rayssl.data.storage import S3Options, StorageError

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


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


def scan(source: str, split: str = "train", class_names: list[str] | None = None,
         s3: S3Options | None = None, allow_outside_root: bool = False) -> Inputs:
    """Detect the kind of ``source`` and list its inputs with sizes and labels (a listing's rows
    outside its folder only with ``allow_outside_root``)."""
    fs, path = storage.resolve(source, s3)
    try:
        info = fs.get_file_info(path)
        if info.type == pyarrow.fs.FileType.File:
            if path.lower().endswith((".parquet", ".csv")):
                return _scan_listing(source, fs, path, info, class_names, s3, allow_outside_root)
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


def load_idx(uri: str, s3: S3Options | None) -> np.ndarray:
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
        pixels, labels = (load_idx(u, s3) for u in uris)
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


def _row_uri(key: str, root: str) -> str:
    """The URI a listing row names: ``s3://`` URIs and absolute paths as written, others under ``root``."""
    if storage.is_s3(key) or os.path.isabs(key):
        return key
    return f"{root}/{key}" if storage.is_s3(root) else os.path.join(root, key)


def _inside(uri: str, root: str) -> bool:
    """Whether ``uri``, with ``..`` resolved lexically, lies under ``root`` (both local or both S3)."""
    if storage.is_s3(uri) != storage.is_s3(root):
        return False
    path, top = (posixpath.normpath(u.removeprefix("s3://")) for u in (uri, root))
    return posixpath.commonpath([path, top]) == top


def _listing_items(source: str, path: str, rows: list[tuple], allow_outside_root: bool) -> tuple[list, list]:
    """``(items, skipped)`` of the listing ``rows`` (key, label, label_name), in key order:
    duplicates skipped, and rows outside the listing's folder unless ``allow_outside_root``."""
    folder = posixpath.dirname(path)
    root = f"s3://{folder}" if storage.is_s3(source) else folder
    parquet = path.lower().endswith(".parquet")
    where, first = ("row", 1) if parquet else ("line", 2)  # a CSV's line 1 is its header
    items, skipped = [], []
    for (key, label, name), row in sorted(zip(rows, range(first, first + len(rows))), key=lambda r: r[0][0]):
        uri = _row_uri(key, root)
        if items and items[-1]["key"] == key:
            skipped.append({"source": key, "reason": "duplicate listing row"})
        elif not allow_outside_root and not _inside(uri, root):
            skipped.append({"source": key, "reason": f"{source} {where} {row}: outside the listing's folder {root} "
                                                     "(make_shards --allow-outside-root allows it)"})
        else:
            items.append({"key": key, "uri": uri, "size": 0, "label": label, "label_name": name})
    return items, skipped


def _scan_listing(source: str, fs: pyarrow.fs.FileSystem, path: str, info: pyarrow.fs.FileInfo,
                  class_names: list[str] | None, s3: S3Options | None, allow_outside_root: bool) -> Inputs:
    """Inputs named by a listing, relative paths under the listing's folder; duplicates and
    (unless ``allow_outside_root``) rows outside that folder skipped."""
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
    items, skipped = _listing_items(source, path, list(zip(keys, labels, names)), allow_outside_root)
    stamp = [(source, info.size, info.mtime_ns or 0)]
    for item, (size, mtime) in zip(items, _stat([it["uri"] for it in items], s3)):
        item["size"] = size
        stamp.append((item["key"], size, mtime))
    return Inputs("listing", items, classes, stamp, skipped=skipped)

