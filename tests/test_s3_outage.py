"""Object-store outages, through a loopback fault proxy (tests/fault_proxy.py) in front of moto.

Without Ray: the proxy's modes, backoff through an outage, a shard read cut in the middle and
resumed without a row lost or repeated, checkpoints never misread during an outage, the run
folder's filesystem given to Ray Train riding out outages, and the one line past
``data.outage_limit_s``. With Ray (tiny runs, short windows and a scaled-down limit):
an outage during shard reads and one during a checkpoint upload ridden out in the same run, and
an outage past the limit that stops the run, keeps the previous checkpoint the newest intact one
and fails the MLflow run. ``benchmarks/faults_s3.py`` measures the 30-s rows by hand.
"""

from __future__ import annotations

import tempfile
import time
import uuid

import boto3
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest
import torch

from fault_proxy import FaultProxy
from rayssl import checkpoint as checkpoints
from rayssl.data import storage
from rayssl.data.datasets import read_piece

ROWS_PER_GROUP, GROUPS = 64, 4


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server) as p:
        yield p


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"out-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def through(proxy: FaultProxy, limit: float = 30.0, attempts: int | None = None
            ) -> tuple[pyarrow.fs.S3FileSystem, storage.S3Options]:
    """rayssl's filesystem through the proxy, or one whose AWS SDK makes only ``attempts`` tries
    per request (a failing request then fails in milliseconds, not after the SDK's backoff)."""
    options = storage.S3Options(proxy.endpoint, outage_limit_s=limit)
    if attempts is None:
        return storage.s3_filesystem(options), options
    return pyarrow.fs.S3FileSystem(endpoint_override=proxy.endpoint, scheme="http", region="us-east-1",
                                   retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts)), options


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_the_proxy_refuses_answers_503_and_passes_again(proxy, bucket) -> None:
    fs, _ = through(proxy, attempts=1)
    with fs.open_output_stream(f"{bucket}/x") as f:
        f.write(b"hello")
    for mode, words in (("refuse", "refusing connections"), ("503", "answering 'service unavailable'")):
        proxy.set_mode(mode)
        for _ in range(2):  # the first request may meet its pooled connection reset ("cutting connections")
            with pytest.raises(OSError) as err:
                fs.get_file_info(f"{bucket}/x")
            assert storage.transient(err.value), err.value
        assert storage.symptom(err.value) == words, err.value
        proxy.set_mode("pass")
        assert fs.get_file_info(f"{bucket}/x").size == 5
    assert proxy.answered_503 > 0 and [w[0] for w in proxy.windows] == ["refuse", "503"]
    with pytest.raises(FileNotFoundError) as err:  # a missing object is no outage
        fs.open_input_stream(f"{bucket}/missing").read()
    assert not storage.transient(err.value)


def test_an_outage_is_ridden_out_with_backoff(proxy, bucket) -> None:
    fs, options = through(proxy)
    with fs.open_output_stream(f"{bucket}/x") as f:
        f.write(b"hello")
    proxy.outage("refuse", 2.0)
    start = time.monotonic()
    info = storage.ride_out(lambda: fs.get_file_info(f"{bucket}/x"), f"s3://{bucket}/x", options, "testing")
    assert info.size == 5 and time.monotonic() - start >= 2.0
    assert proxy.recovered() is not None and proxy.recovered() < storage.BACKOFF[1] + 10


def shard(fs: pyarrow.fs.FileSystem, path: str) -> tuple[list[bytes], list[int]]:
    """A Parquet file of ``GROUPS`` row groups, each ``image`` chunk apart from the next (a ``pad``
    column between), so each is its own ranged GET; its rows and each chunk's first byte."""
    rng = np.random.default_rng(0)
    rows = ROWS_PER_GROUP * GROUPS
    images = [i.to_bytes(4, "little") + rng.bytes(4096) for i in range(rows)]
    pads = [rng.bytes(1024) for _ in range(rows)]  # distinct: no dictionary makes the gap small
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "pad": pa.array(pads)}), path, filesystem=fs,
                   row_group_size=ROWS_PER_GROUP)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    starts = [min(o for o in (c.dictionary_page_offset, c.data_page_offset) if o is not None)
              for c in (meta.row_group(g).column(0) for g in range(GROUPS))]
    return images, starts


@pytest.mark.slow  # backoff through the fault proxy
def test_a_shard_read_cut_in_the_middle_resumes_without_losing_or_repeating_a_row(proxy, bucket) -> None:
    """The ranged GET of the third row group is held (the first two are read and given), then
    refused for 2 s: the read opens the shard again and goes on after the rows it gave."""
    fs, options = through(proxy)
    path = f"{bucket}/shard-00000.parquet"
    images, starts = shard(fs, path)
    proxy.arm("refuse", 2.0, method="GET", path=r"/shard-00000\.parquet", head=f"(?i)range: bytes={starts[2]}-",
              hold=0.5)
    rows = ROWS_PER_GROUP * GROUPS - 40  # the piece ends inside the last row group
    given = []
    for table in read_piece(fs, path, rows, 48, options):
        given.append((len(proxy.windows), table.column("image").to_pylist()))
    assert len(proxy.windows) == 1 and proxy.windows[0][3].startswith("GET "), proxy.windows
    assert [v for _, block in given for v in block] == images[:rows]  # none lost, none twice
    assert sum(len(block) for before, block in given if before == 0) >= 2 * 48  # the first two groups' blocks


def test_past_the_limit_one_line_names_the_bucket_and_what_to_check(proxy, bucket) -> None:
    fs, options = through(proxy, limit=1.5, attempts=1)
    proxy.set_mode("503")
    start = time.monotonic()
    with pytest.raises(storage.StorageOutage) as err:
        list(read_piece(fs, f"{bucket}/fm/shard-00000.parquet", 10, 10, options))
    assert time.monotonic() - start >= 1.5
    text = one_line(err.value)
    assert text.startswith(f"s3://{bucket}/fm/shard-00000.parquet: object storage answering 'service unavailable' "
                           "for ") and "while reading shards, past data.outage_limit_s=1.5;" in text
    assert f"bucket '{bucket}'" in text and proxy.endpoint in text and "credentials" in text, text
    # found again behind the errors Ray wraps it in, by type or by its line
    wrapped = RuntimeError("worker failed")
    wrapped.__cause__ = err.value
    assert storage.find_outage(wrapped) is err.value
    assert str(storage.find_outage(RuntimeError(f"Traceback ...\nStorageOutage: {text}\n  more"))) == text
    assert storage.find_outage(RuntimeError("something else")) is None


def test_checkpoints_are_never_misread_during_an_outage(proxy, bucket) -> None:
    """A refused read is raised, not taken for a missing or damaged checkpoint (which would make
    an older one, or none, the newest intact one); ridden out, the newest intact one is found."""
    fs, options = through(proxy, limit=1.0, attempts=1)
    run = f"{bucket}/runs/r"
    for step in (3, 6):
        folder = f"{run}/checkpoint_2026-12-05_00-00-0{step}"
        fs.create_dir(folder)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints.save({"step": step, "teacher": {"w": torch.zeros(2)}}, tmp)
            for name in (checkpoints.CHECKPOINT_FILE, checkpoints.MANIFEST_FILE):
                pyarrow.fs.copy_files(f"{tmp}/{name}", f"{folder}/{name}", pyarrow.fs.LocalFileSystem(), fs)
    half = f"{run}/checkpoint_2026-12-05_00-00-09"  # its upload was cut before the manifest
    with fs.open_output_stream(f"{half}/{checkpoints.CHECKPOINT_FILE}") as f:
        f.write(b"\x80\x02 half")

    proxy.set_mode("refuse")
    with pytest.raises(OSError) as err:
        checkpoints.latest_intact(fs, run)
    assert storage.transient(err.value)
    with pytest.raises(storage.StorageOutage, match=f"^s3://{run}: object storage refusing connections"):
        storage.ride_out(lambda: checkpoints.latest_intact(fs, run), f"s3://{run}", options, "reading checkpoints")
    proxy.outage("503", 1.5)
    options = storage.S3Options(proxy.endpoint, outage_limit_s=30)
    folder, state = storage.ride_out(lambda: checkpoints.latest_intact(fs, run), f"s3://{run}", options, "reading")
    assert state["step"] == 6 and folder.endswith("00-06")  # the half-uploaded folder is passed over


# -- real Ray runs ---------------------------------------------------------------------------------

WINDOW = 6.0  # seconds of each outage in the Ray tests (benchmarks/faults_s3.py measures 30)


@pytest.fixture(scope="module")
def s3_shards(ray_cluster, s3_server, small_fashion_mnist) -> tuple[str, str]:
    """``(bucket, train URI)``: the small Fashion-MNIST train split as shards in moto, written
    straight to moto (not through a proxy)."""
    from rayssl.data.shards import make_shards

    bucket = f"outage-{uuid.uuid4().hex[:6]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/fm/train"
    make_shards(small_fashion_mnist, uri, split="train", min_shards=8, progress=lambda line: None,
                s3=storage.S3Options(s3_server))
    return bucket, uri


def outage_config(tmp_path, s3_shards, proxy: FaultProxy, name: str, *extra: str):
    """test_train_ray's tiny run (2 workers, 12 steps, a checkpoint every 6) on shards and with
    checkpoints in s3://, both through ``proxy``; MLflow in a local SQLite store."""
    from test_train_ray import tiny_config

    bucket, uri = s3_shards
    return tiny_config(tmp_path, [f"data.source={uri}", f"data.endpoint_url={proxy.endpoint}"], name,
                       "train.epochs=2", "eval.baselines=false", "run.max_failures=0", "tracking.log_model=false",
                       f"run.storage_path=s3://{bucket}/runs", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra)


def mlflow_run(tmp_path, name: str):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("rayssl").experiment_id],
                             f"tags.mlflow.runName = '{name}'")[0]
    return run, [m.step for m in client.get_metric_history(run.info.run_id, "loss")]


def intact_steps(bucket: str, name: str) -> tuple[pyarrow.fs.FileSystem, str, list[int]]:
    """The run folder read straight from moto (``AWS_ENDPOINT_URL``), and its intact checkpoints' steps."""
    fs, run = storage.resolve(f"s3://{bucket}/runs/{name}")
    states = [checkpoints.load_intact(fs, folder) for folder in checkpoints.candidates(fs, run)]
    return fs, run, sorted(s["step"] for s in states if s is not None)


def test_outages_during_shard_reads_and_a_checkpoint_upload_are_ridden_out(ray_cluster, s3_shards, proxy,
                                                                          tmp_path) -> None:
    """503s from the first shard read on, then refused connections from the upload of step 6's
    checkpoint on, each for ``WINDOW`` s: the run finishes as if nothing happened, nothing
    recomputed, every checkpoint intact, every MLflow point there. (Its data has no evaluation
    split, so no k-NN: it also shows the end-of-run figures drawn from a pass of their own.)"""
    from rayssl.train.launch import pretrain

    bucket, _ = s3_shards
    name = f"ridden-{uuid.uuid4().hex[:6]}"
    proxy.arm("503", WINDOW, method="GET", path=r"/fm/train/shard-")
    proxy.arm("refuse", WINDOW, path=r"/checkpoint_[^/?]*_step0000006/checkpoint\.pt")
    results = pretrain(outage_config(tmp_path, s3_shards, proxy, name, "data.outage_limit_s=60"))

    reads, upload = proxy.windows
    assert reads[0] == "503" and "/fm/train/shard-" in reads[3] and reads[2] - reads[1] >= WINDOW - 0.1
    assert upload[0] == "refuse" and "_step0000006/checkpoint.pt" in upload[3] and upload[2] is not None
    assert proxy.recovered(0) is not None and proxy.recovered(1) is not None  # the retries got through
    assert "resumed_from_step" not in results  # no restart: nothing recomputed
    assert [m["step"] for m in results["history"]] == list(range(2, 13, 2))
    assert intact_steps(bucket, name)[2] == [6, 12]  # the struck checkpoint too
    run, loss_steps = mlflow_run(tmp_path, name)
    assert run.info.status == "FINISHED" and loss_steps == list(range(2, 13, 2))
    # no data.eval_source, so no k-NN: the figures come from their own pass over the (labelled) training shards
    drawn = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(run.info.run_id, "plots/clusters")
    assert "knn/teacher" not in results and results["eval_seconds"] > 0
    assert sorted(a.path for a in drawn) == [f"plots/clusters/{name}.png" for name in
                                             ("cluster_class_map", "gallery_tail", "gallery_top")]


def test_an_outage_past_the_limit_stops_the_run_and_keeps_the_previous_checkpoint(ray_cluster, s3_shards, proxy,
                                                                                 tmp_path) -> None:
    """Connections refused from the upload of step 12's manifest on (its checkpoint.pt is
    already up: a half-written folder), past ``data.outage_limit_s=4``: the run stops with one
    line naming the bucket and what to check, the MLflow run is FAILED, and the newest intact
    checkpoint is step 6's, the half-written folder passed over."""
    from rayssl.train.launch import pretrain

    bucket, _ = s3_shards
    name = f"past-{uuid.uuid4().hex[:6]}"
    proxy.arm("refuse", 60, path=r"/checkpoint_[^/?]*_step0000012/checkpoint\.json")
    with pytest.raises(Exception) as err:
        pretrain(outage_config(tmp_path, s3_shards, proxy, name, "data.outage_limit_s=4"))
    stopped = time.time()
    assert len(proxy.windows) == 1 and proxy.windows[0][2] is None, proxy.windows  # still down when it stopped
    struck = proxy.windows[0][1]
    proxy.clear()

    outage = storage.find_outage(err.value)
    assert outage is not None, err.value
    text = one_line(outage)
    assert text.startswith(f"s3://{bucket}/runs/{name}/checkpoint_") and "_step0000012: object storage refusing" in text
    assert "while uploading a checkpoint, past data.outage_limit_s=4;" in text and f"bucket '{bucket}'" in text
    assert proxy.endpoint in text and "credentials" in text and "network" in text
    assert 4 <= stopped - struck < 60

    fs, run, steps = intact_steps(bucket, name)
    assert steps == [6]
    half = [f for f in checkpoints.candidates(fs, run) if f.endswith("_step0000012")]
    assert half and fs.get_file_info(f"{half[0]}/{checkpoints.CHECKPOINT_FILE}").type == pyarrow.fs.FileType.File
    skipped: list[str] = []
    folder, state = checkpoints.latest_intact(fs, run, skipped)
    assert state["step"] == 6 and folder.endswith("_step0000006") and skipped == []  # what a resume takes
    mlrun, loss_steps = mlflow_run(tmp_path, name)
    assert mlrun.info.status == "FAILED" and loss_steps[:5] == [2, 4, 6, 8, 10]


@pytest.mark.slow  # backoff through the fault proxy
def test_the_run_folder_filesystem_rides_out_outages_on_every_call(proxy, bucket) -> None:
    """``storage.riding_out``: what Ray Train is given for the run folder (its checkpoint
    registry, old checkpoints' deletion); pickled to Ray's processes, equal to itself."""
    import pickle

    raw, options = through(proxy, limit=20, attempts=1)
    fs = storage.riding_out(raw, options)
    assert pickle.loads(pickle.dumps(fs)) == fs and fs != raw
    proxy.outage("refuse", 1.5)
    with fs.open_output_stream(f"{bucket}/runs/r/snapshot.json") as f:  # uploaded whole on close
        f.write(b'{"a": 1}')
    proxy.outage("503", 1.5)
    with fs.open_input_stream(f"{bucket}/runs/r/snapshot.json") as f:
        assert f.read() == b'{"a": 1}'
    proxy.outage("refuse", 1.5)
    fs.delete_dir(f"{bucket}/runs/r")
    assert fs.get_file_info(f"{bucket}/runs/r/snapshot.json").type == pyarrow.fs.FileType.NotFound
    assert [w[0] for w in proxy.windows] == ["refuse", "503", "refuse"]

    proxy.set_mode("refuse")
    short = storage.riding_out(raw, storage.S3Options(proxy.endpoint, outage_limit_s=1))
    with pytest.raises(storage.StorageOutage, match=r"while writing the run folder, past data.outage_limit_s=1;"):
        with short.open_output_stream(f"{bucket}/runs/r/snapshot.json") as f:
            f.write(b"x")
