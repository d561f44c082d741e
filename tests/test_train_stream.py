"""The training stream: every epoch of a run as one Ray Data dataset (``rayssl.data.datasets.train_stream``).

Without Ray: which rows each epoch reads (``shard_pieces``, ``read_pieces``). With the session's
Ray cluster: the stream's rows, epoch by epoch, and ``data.train_limit``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from rayssl.config import load_config
from rayssl.data.datasets import read_pieces, shard_pieces, train_stream

SHARD_ROWS = (5, 7, 3)


def write_shards(root) -> dict:
    """Three shards whose ``image`` values name their shard and row (``b"s1r4"``), and a manifest."""
    shards = []
    for s, rows in enumerate(SHARD_ROWS):
        path = f"shard-{s}.parquet"
        pq.write_table(pa.table({"image": pa.array([f"s{s}r{r}".encode() for r in range(rows)], pa.binary())}),
                       str(root / path), row_group_size=2)
        shards.append({"path": path, "num_images": rows})
    return {"num_images": sum(SHARD_ROWS), "total_bytes": 100, "shards": shards}


def test_shard_pieces_cut_the_last_shard_at_the_limit(tmp_path) -> None:
    manifest = write_shards(tmp_path)
    assert shard_pieces(manifest, "/r", None) == [("/r/shard-0.parquet", 5), ("/r/shard-1.parquet", 7),
                                                  ("/r/shard-2.parquet", 3)]
    assert shard_pieces(manifest, "/r", 8) == [("/r/shard-0.parquet", 5), ("/r/shard-1.parquet", 3)]


def rows_of(ids, pieces, seed: int, block_rows: int = 2) -> list[bytes]:
    fs = pyarrow.fs.LocalFileSystem()
    blocks = list(read_pieces({"id": np.array(ids)}, pieces, fs, seed, block_rows))
    assert all(b.num_rows <= block_rows for b in blocks)
    return [v for b in blocks for v in b.column("image").to_pylist()]


def test_each_epoch_reads_every_limited_row_once_in_its_own_file_order(tmp_path) -> None:
    """Epoch e's reads are ids e*P .. e*P+P-1: together the first ``limit`` rows exactly once, the
    file order drawn from (seed, epoch): the same for the same seed, different across epochs."""
    pieces = shard_pieces(write_shards(tmp_path), str(tmp_path), 10)  # shard 0 whole, 5 rows of shard 1
    expected = Counter([f"s0r{r}".encode() for r in range(5)] + [f"s1r{r}".encode() for r in range(5)])
    orders = []
    for epoch in range(6):
        rows = rows_of(range(epoch * 2, epoch * 2 + 2), pieces, seed=3)
        assert Counter(rows) == expected, epoch
        orders.append(rows[0][:2])
    assert len(set(orders)) == 2  # both file orders occur over six epochs
    assert rows_of([4, 5], pieces, seed=3) == rows_of([4, 5], pieces, seed=3)


@pytest.mark.parametrize("limit", [None, 9])
def test_the_stream_holds_every_epoch_of_the_run(ray_cluster, tmp_path, limit) -> None:
    """Through Ray Data: 3 epochs are one dataset of 3 x the (limited) rows, each row 3 times."""
    manifest = write_shards(tmp_path)
    cfg = load_config(None, [f"data.source={tmp_path}"] + ([f"data.train_limit={limit}"] if limit else []))
    stream = train_stream(str(tmp_path), manifest, cfg.data, epochs=3, seed=None)
    rows = Counter(v for b in stream.iter_batches(batch_size=4, batch_format="numpy") for v in b["image"])
    kept = [f"s{s}r{r}".encode() for s, n in enumerate(SHARD_ROWS) for r in range(n)][:limit]
    assert rows == Counter({row: 3 for row in kept})
