"""Object-storage errors against real S3-compatible servers on 127.0.0.1 (moto)."""

from __future__ import annotations

import socket
import uuid

import boto3
import pytest

from rayssl.data import storage


@pytest.fixture
def bucket(s3_server) -> str:
    name = f"bkt-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


def _one_line_naming(err: pytest.ExceptionInfo, uri: str) -> str:
    msg = str(err.value)
    assert msg.startswith(uri) and "\n" not in msg
    return msg


def test_missing_bucket_named(s3_server) -> None:
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(storage.StorageError) as err:
            check("s3://no-such-bucket-xyz/prefix")
        assert "bucket does not exist" in _one_line_naming(err, "s3://no-such-bucket-xyz/prefix")


def test_missing_prefix_and_writable_bucket(bucket) -> None:
    with pytest.raises(storage.StorageError) as err:
        storage.check_readable(f"s3://{bucket}/nothing-here")
    assert "not found" in _one_line_naming(err, f"s3://{bucket}/nothing-here")
    storage.check_writable(f"s3://{bucket}/out")  # probe written and removed
    s3 = boto3.client("s3", endpoint_url=storage.endpoint())
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert [k for k in keys if not k.endswith("/")] == []  # pyarrow may leave a folder marker


def test_wrong_credentials_named(strict_s3_server) -> None:
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(storage.StorageError) as err:
            check("s3://some-bucket/data", endpoint_url=strict_s3_server)
        assert "access denied" in _one_line_naming(err, "s3://some-bucket/data")


def test_unreachable_endpoint_named(s3_server) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(storage.StorageError) as err:
        storage.check_readable("s3://bkt/data", endpoint_url=f"http://127.0.0.1:{port}")
    msg = _one_line_naming(err, "s3://bkt/data")
    assert "cannot reach the endpoint" in msg and str(port) in msg


def test_local_paths_and_schemes(tmp_path) -> None:
    fs, path = storage.resolve(str(tmp_path / "x" / ".." / "y"))
    assert path == str(tmp_path / "y")
    storage.check_writable(str(tmp_path / "new" / "dir"))
    assert (tmp_path / "new" / "dir").is_dir()
    with pytest.raises(storage.StorageError, match="^gs://b/p: unsupported scheme"):
        storage.resolve("gs://b/p")
    with pytest.raises(storage.StorageError, match="not found"):
        storage.check_readable(str(tmp_path / "missing"))
