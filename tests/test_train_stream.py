"""The training stream: every epoch of the run in one Ray Data execution, one task per shard
(``rayssl.data.datasets.train_stream``).

Without Ray: which rows a shard's task reads (``shard_pieces``, ``read_pieces``) and the epochs'
shard orders (``run_order``). With the session's Ray cluster: every epoch of an execution holds
each (limited) row once, in a fresh shard order unless seeded, and the multi-crop stage's blocks
stay one stage call each.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from rayssl.config import load_config
from rayssl.data.datasets import byte_rows, online_limits, read_pieces, run_order, shard_pieces, train_stream
from rayssl.data.meta import DataMeta

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


def test_a_piece_is_read_in_blocks_up_to_its_rows(tmp_path) -> None:
    pieces = shard_pieces(write_shards(tmp_path), str(tmp_path), 8)  # shard 0 whole, 3 rows of shard 1
    blocks = list(read_pieces({"id": np.array([1, 0])}, pieces, pyarrow.fs.LocalFileSystem(), block_rows=2))
    assert [b.num_rows for b in blocks] == [2, 1, 2, 2, 1]
    rows = [v for b in blocks for v in b.column("image").to_pylist()]
    assert rows == [b"s1r0", b"s1r1", b"s1r2"] + [f"s0r{r}".encode() for r in range(5)]


def test_each_epoch_is_a_permutation_of_the_pieces() -> None:
    fresh = run_order(5, 4, None).reshape(4, 5)
    assert all(sorted(epoch) == list(range(5)) for epoch in fresh.tolist())
    assert len({tuple(epoch) for epoch in fresh.tolist()}) > 1  # 4 draws of 120 orders
    assert (run_order(5, 3, 7) == run_order(5, 3, 7)).all()


def test_byte_blocks_hold_about_16_mib() -> None:
    def rows(mean_bytes: int) -> int:
        return byte_rows({"num_images": 1000, "total_bytes": 1000 * mean_bytes})
    assert rows(514) == 4096  # Fashion-MNIST PNGs: the row cap
    assert rows(110_000) == 152  # ~500 x 375 JPEGs: 16 MiB
    assert rows(50_000_000) == 16  # the row floor


@pytest.mark.parametrize("overrides, num_train, num_eval, expected", [
    ([], 60_000, 10_000, (5_000, 1_000)),                                   # the default: smaller sets
    (["eval.knn_train_limit=2000"], 60_000, 10_000, (2_000, 1_000)),       # the bank's limit bounds both
    ([], 4_000, 10_000, (4_000, 1_000)),                                    # the queries alone are cut
    ([], 1_024, 256, None),                                                 # nothing cut: the final sets
    (["eval.online_train_limit=1024", "eval.online_eval_limit=256"], 1_024, 256, None),
    (["eval.every_epochs=null"], 60_000, 10_000, None),                     # no online points
    ([], 60_000, 0, None),                                                  # no labelled evaluation split
])
def test_online_sets_exist_only_where_their_limits_cut_the_final_ones(overrides, num_train, num_eval, expected):
    cfg = load_config(None, ["eval.every_epochs=1", *overrides])
    meta = DataMeta(num_train, num_eval, 1, 28, ("a", "b"), (0.5,), (0.25,))
    assert online_limits(cfg, meta) == expected


def rows_of(stream) -> list[bytes]:
    return [v for b in stream.iter_batches(batch_size=None, batch_format="numpy") for v in b["image"]]


@pytest.mark.ray
@pytest.mark.parametrize("limit", [None, 9])
def test_one_execution_holds_every_epoch(ray_cluster, tmp_path, limit) -> None:
    """Twelve epochs, in one execution or one each: every epoch the (limited) rows exactly once, in
    varying shard orders (all alike by chance: 2**-11 with the limit's 2 shards); seeded
    (``data.deterministic``: an epoch per execution), every execution repeats one order."""
    manifest = write_shards(tmp_path)
    cfg = load_config(None, [f"data.source={tmp_path}"] + ([f"data.train_limit={limit}"] if limit else []))
    kept = Counter([f"s{s}r{r}".encode() for s, n in enumerate(SHARD_ROWS) for r in range(n)][:limit])
    n = sum(kept.values())
    for epochs, seed in ((12, None), (1, None), (1, 3)):
        stream = train_stream(str(tmp_path), manifest, cfg.data, 2, epochs, seed)
        stream.context.execution_options.preserve_order = True  # to cut the epochs apart
        rows = [v for _ in range(12 // epochs) for v in rows_of(stream)]
        cut = [rows[i:i + n] for i in range(0, len(rows), n)]
        assert len(cut) == 12 and all(Counter(epoch) == kept for epoch in cut)
        firsts = {tuple(dict.fromkeys(v[:2] for v in epoch)) for epoch in cut}  # the shard order
        assert (len(firsts) > 1) == (seed is None), (epochs, seed, firsts)


def test_the_crop_stage_yields_one_block_per_call(shard_cache) -> None:
    """A shard's task emits a block per ``stage_rows`` call (113 rows at 192 px), so the workers'
    equal split is fed within a call's time, not after the whole shard (256 rows) is cropped."""
    from rayssl.data.datasets import build_datasets, plan_data, stage_rows

    cfg = load_config(None, shard_cache + ["data.train_limit=512", "augment.global_crop_size=192", "train.epochs=1"])
    plan = plan_data(cfg)
    rows = stage_rows(cfg.augment, plan.meta.channels)
    sizes = [len(b["ok"]) for b in build_datasets(cfg, plan)["train"].iter_batches(batch_size=None)]
    assert rows < 256 and sum(sizes) == 512 and max(sizes) <= rows, (rows, sizes)


def test_each_shard_is_cropped_by_its_own_task(shard_cache, monkeypatch) -> None:
    """One task per shard piece, so the pieces are cropped in parallel: a ``batch_size`` on the
    crop stage would become the fused task's minimum input and put every piece in one task."""
    import ray

    from rayssl.data import datasets

    def tagged(batch, **kwargs):
        out = crop(batch, **kwargs)
        return {**out, "task": np.full(len(out["ok"]), ray.get_runtime_context().get_task_id())}

    crop = datasets.multicrop_stage
    monkeypatch.setattr(datasets, "multicrop_stage", tagged)
    cfg = load_config(None, shard_cache + ["data.train_limit=512", "train.epochs=1"])
    plan = datasets.plan_data(cfg)
    pieces = datasets.shard_pieces(plan.train, "", 512)
    tasks = {t for b in datasets.build_datasets(cfg, plan)["train"].iter_batches(batch_size=None) for t in b["task"]}
    assert len(pieces) > 1 and len(tasks) == len(pieces), (pieces, tasks)
