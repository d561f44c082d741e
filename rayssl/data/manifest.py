"""``manifest.json``: what a folder of shards holds, and whether it is up to date.

The manifest is written last, after every shard: it names the shards with their sizes and
hashes, the classes and their counts, the pixel mean / std, every skipped or converted input
with its reason, and the fingerprint of the source and options that made it (``fingerprint``),
so that a rerun with the same source and options does nothing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np
import pyarrow.fs

from rayssl.config import ConfigError
from rayssl.data import storage
from rayssl.data.sources import Inputs
from rayssl.data.storage import S3Options, StorageError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def fingerprint(source: str, inputs: Inputs, options: dict) -> str:
    """sha256 over the source, its sorted (key, size, mtime) entries and the options."""
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, source, options], sort_keys=True).encode())
    for entry in sorted(inputs.stamp):
        h.update(json.dumps(entry).encode())
    return h.hexdigest()


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


def read_json(fs: pyarrow.fs.FileSystem, path: str) -> dict:
    """Parse the JSON file at ``path``."""
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def write_json(fs: pyarrow.fs.FileSystem, path: str, value: dict) -> None:
    """Write ``value`` whole or not at all: an S3 object appears on close; a local file is renamed."""
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    with fs.open_output_stream(path + ".tmp" if local else path) as f:
        f.write(json.dumps(value, indent=1).encode())
    if local:
        fs.move(path + ".tmp", path)


def up_to_date(fs: pyarrow.fs.FileSystem, dest: str, source_fingerprint: str) -> dict | None:
    """The existing manifest when it matches ``source_fingerprint`` and all its shards exist."""
    try:
        manifest = read_json(fs, f"{dest}/{MANIFEST}")
    except (FileNotFoundError, ValueError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("source_fingerprint") != source_fingerprint:
        return None
    infos = fs.get_file_info([f"{dest}/{s['path']}" for s in manifest["shards"]])
    return manifest if all(i.type == pyarrow.fs.FileType.File for i in infos) else None


def reuse_or_clear(fs: pyarrow.fs.FileSystem, dest: str, destination: str, source_fingerprint: str, force: bool,
                   progress) -> dict | None:
    """A shard writer's first step: the existing manifest when it is ``up_to_date`` (and not
    ``force``), said through ``progress``; else None, with the old manifest removed, so that it
    never points at shards that are being rewritten."""
    if not force and (manifest := up_to_date(fs, dest, source_fingerprint)) is not None:
        progress(f"[make_shards] {destination}: up to date ({manifest['num_images']} images, "
                 f"{len(manifest['shards'])} shards)")
        return manifest
    if fs.get_file_info(f"{dest}/{MANIFEST}").type == pyarrow.fs.FileType.File:
        fs.delete_file(f"{dest}/{MANIFEST}")
    return None


def load_manifest(uri: str, s3: S3Options | None = None) -> dict:
    """The ``manifest.json`` of the shards at ``uri``; ``StorageError`` (one line) when missing."""
    fs, root = storage.resolve(uri, s3)
    try:
        if storage.is_s3(uri) and fs.get_file_info(root.split("/", 1)[0]).type == pyarrow.fs.FileType.NotFound:
            raise StorageError(f"{uri}: bucket does not exist")
        manifest = read_json(fs, f"{root}/{MANIFEST}")
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
