"""One shard, written by one Ray Data task: read its inputs, check them, write the Parquet file.

Bad inputs are skipped or converted (``images.check``) and returned with a reason in the
shard's stats, which ``rayssl.data.manifest.build_manifest`` gathers into the manifest. Inputs are
untrusted: a file is read up to ``images.Limits.max_bytes`` (one byte more tells that it is larger)
and an image is checked against ``images.Limits.max_pixels`` before it is decoded.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
from PIL import Image

from rayssl.data import images, storage
from rayssl.data.sources import load_idx
from rayssl.data.storage import S3Options

COLUMNS = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                     ("label_name", pa.string()), ("source", pa.string()), ("width", pa.int32()),
                     ("height", pa.int32())])
ROW_GROUP = 1000            # rows per Parquet row group ...
ROW_GROUP_BYTES = 64 * 2**20  # ... or fewer when their images pass this size
STATS_SIZE = 64  # at most this size (a centre square) for the mean / std


@dataclass(frozen=True)
class ShardJob:
    """What every shard task needs besides its plan."""

    dest_fs: pyarrow.fs.FileSystem
    dest: str
    reencode: str | None
    classes: list[str]
    s3: S3Options
    limits: images.Limits


def _file_bytes(items: list[dict], s3_options: S3Options | None, max_bytes: int
                ) -> Iterator[tuple[dict, bytes | str]]:
    """``(item, bytes)`` per input, or ``(item, reason)`` when it cannot be read or holds more
    than ``max_bytes`` (of which at most one byte more is read)."""
    filesystems: dict[bool, pyarrow.fs.FileSystem] = {}
    for item in items:
        s3 = storage.is_s3(item["uri"])
        try:
            if s3 not in filesystems:
                filesystems[s3] = storage.resolve(item["uri"], s3_options)[0]
            with filesystems[s3].open_input_stream(item["uri"].removeprefix("s3://")) as f:
                data = f.read(max_bytes + 1)
        except OSError as err:
            yield item, f"unreadable: {err}".splitlines()[0]
            continue
        yield item, data if len(data) <= max_bytes else f"too large: over {max_bytes} bytes (data.max_item_bytes)"


def _idx_bytes(spec: dict, classes: list[str], s3: S3Options | None) -> Iterator[tuple[dict, bytes]]:
    """``(item, PNG bytes)`` for the rows ``spec['start']:spec['stop']`` of an IDX pair."""
    pixels = load_idx(spec["images"], s3)
    labels = load_idx(spec["labels"], s3)
    name = posixpath.basename(spec["images"])
    for i in range(spec["start"], spec["stop"]):
        buf = io.BytesIO()
        Image.fromarray(pixels[i], "L").save(buf, "PNG")
        label = int(labels[i])
        yield ({"key": f"{name}#{i}", "uri": f"{spec['images']}#{i}", "label": label,
                "label_name": classes[label]}, buf.getvalue())


class _ShardStats:
    """Counts, content hash and pixel statistics of the rows of one shard."""

    def __init__(self, index: int, num_classes: int, limits: images.Limits) -> None:
        self.index = index
        self.limits = limits
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
        thumb = images.decode(image.data, 3, size, self.limits).reshape(-1, 3) / 255.0
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


def write_shard(shard: dict, job: ShardJob) -> dict:
    """Read, check and write the inputs of one shard plan; its stats (counts, hash, pixels, issues)."""
    if "idx" in shard:
        inputs = _idx_bytes(shard["idx"], job.classes, job.s3)
    else:
        inputs = _file_bytes(shard["items"], job.s3, job.limits.max_bytes)
    stats = _ShardStats(shard["index"], len(job.classes), job.limits)
    path = f"{job.dest}/{shard['path']}"
    rows: dict[str, list] = {name: [] for name in COLUMNS.names}
    buffered = 0
    with pq.ParquetWriter(path, COLUMNS, filesystem=job.dest_fs) as writer:
        for item, data in inputs:
            if isinstance(data, str):
                stats.skipped.append({"source": item["uri"], "reason": data})
                continue
            try:
                image = images.check(data, job.reencode, job.limits)
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

