"""Object storage at the edge: a local path or ``s3://bucket/prefix`` as a pyarrow filesystem.

One set of settings serves the training data, the shards written by ``jobs/make_shards.py``
and the checkpoints (``run.storage_path``): credentials from the standard AWS chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance role), an
endpoint for MinIO / Ceph / other S3-compatible stores (``data.endpoint_url`` or
``AWS_ENDPOINT_URL``), a region (``data.region``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``) and
retries with exponential backoff for transient errors. Failures become a ``StorageError``:
one line naming the URI and saying what to fix, raised before any training starts.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pyarrow.fs

from rayssl.config import ConfigError

RETRIES = 5


class StorageError(ConfigError):
    """A missing bucket or object, refused credentials or an unreachable endpoint (one line)."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 filesystem; credentials are resolved by the AWS SDK's default chain on each node."""
    url = endpoint(endpoint_url)
    return pyarrow.fs.S3FileSystem(
        endpoint_override=url,
        scheme="http" if url and url.startswith("http://") else "https",
        region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=5, request_timeout=30,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=RETRIES))


def resolve(uri: str, endpoint_url: str | None = None, region: str | None = None
            ) -> tuple[pyarrow.fs.FileSystem, str]:
    """``(filesystem, path)`` for ``s3://bucket/prefix`` or a local path (made absolute)."""
    if is_s3(uri):
        return s3_filesystem(endpoint_url, region), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pyarrow.fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


_REASONS = [
    (r"NoSuchBucket|bucket does not exist|Bucket .* does not exist", "bucket does not exist"),
    (r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|ACCESS_DENIED|Forbidden|HTTP response code: 403"
     r"|InvalidToken|ExpiredToken|No response body",
     "access denied: check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"),
    (r"curlCode: (6|7|28)|Couldn't connect|Could not resolve|Connection refused|timed out|Timeout",
     "cannot reach the endpoint"),
]


def explain(uri: str, err: BaseException, endpoint_url: str | None = None) -> StorageError:
    """A one-line ``StorageError`` for an error raised while touching ``uri``."""
    text = str(err)
    for pattern, reason in _REASONS:
        if re.search(pattern, text):
            if reason == "cannot reach the endpoint":
                reason += f" {endpoint(endpoint_url) or 'AWS S3'} (check data.endpoint_url / AWS_ENDPOINT_URL)"
            return StorageError(f"{uri}: {reason}")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return StorageError(f"{uri}: {first}")


def check_readable(uri: str, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Raise ``StorageError`` unless ``uri`` (file or folder) exists and can be read."""
    fs, path = resolve(uri, endpoint_url, region)
    try:
        if is_s3(uri):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                raise StorageError(f"{uri}: bucket does not exist")
        info = fs.get_file_info(path)
    except StorageError:
        raise
    except OSError as err:
        raise explain(uri, err, endpoint_url) from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"{uri}: not found")


def check_writable(uri: str, endpoint_url: str | None = None, region: str | None = None) -> None:
    """Raise ``StorageError`` unless an object can be written (and removed) under ``uri``."""
    fs, path = resolve(uri, endpoint_url, region)
    probe = f"{path}/.rayssl-write-check-{uuid.uuid4().hex[:8]}"
    try:
        if is_s3(uri):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                raise StorageError(f"{uri}: bucket does not exist")
        else:
            fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except StorageError:
        raise
    except OSError as err:
        raise explain(uri, err, endpoint_url) from None
