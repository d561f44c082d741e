"""Object storage at the edge: a local path or ``s3://bucket/prefix`` as a pyarrow filesystem.

One set of settings, ``S3Options`` (``S3Options.of(cfg.data)``), serves the training data, the
shards written by ``jobs/make_shards.py`` and the checkpoints (``run.storage_path``): credentials
from ``data.access_key_id``/``data.secret_access_key`` when both are set, else from the standard AWS
chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance role), an
endpoint for MinIO / Ceph / other S3-compatible stores (``data.endpoint_url`` or
``AWS_ENDPOINT_URL``), a region (``data.region``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``) and
retries with exponential backoff for transient errors. Failures become a ``StorageError``:
one line naming the URI and saying what to fix, raised before any training starts; it never
contains a secret.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs
from pydantic import SecretStr

from rayssl.config import MASK, ConfigError, DataConfig, mask_uri

RETRIES = 5


class StorageError(ConfigError):
    """A missing bucket or object, refused credentials or an unreachable endpoint (one line)."""


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: endpoint, region and, optionally, a static key pair.

    Without keys the AWS SDK's default chain applies on each node. The keys are held as
    ``SecretStr`` and left out of ``repr``; they only leave this object inside a pyarrow
    ``S3FileSystem`` (which Ray pickles to its tasks). Both keys or neither (``ConfigError``).
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = field(default=None, repr=False)
    secret_access_key: SecretStr | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("access_key_id", "secret_access_key"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, SecretStr(value))
        given = {name: bool(getattr(self, name) and getattr(self, name).get_secret_value())
                 for name in ("access_key_id", "secret_access_key")}
        if given["access_key_id"] != given["secret_access_key"]:
            missing, present = sorted(given, key=given.get)
            raise ConfigError(f"data.{missing}: not set while data.{present} is; set both, or neither "
                              "to use the AWS credential chain")

    @classmethod
    def of(cls, data: DataConfig) -> S3Options:
        """The options of a config's ``data`` section (``ConfigError`` if only one key is set)."""
        return cls(data.endpoint_url, data.region, data.access_key_id, data.secret_access_key)

    @property
    def has_keys(self) -> bool:
        return self.access_key_id is not None and bool(self.access_key_id.get_secret_value())

    def scrub(self, text: str) -> str:
        """``text`` with the keys (and any ``user:password@`` in URIs) replaced by ``***``."""
        if self.has_keys:
            for secret in (self.secret_access_key, self.access_key_id):
                text = text.replace(secret.get_secret_value(), MASK)
        return mask_uri(text)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(options: S3Options | None = None) -> pyarrow.fs.S3FileSystem:
    """A pyarrow S3 filesystem: the options' keys, else the AWS SDK's default chain on each node."""
    o = options or S3Options()
    url = endpoint(o.endpoint_url)
    keys = ({"access_key": o.access_key_id.get_secret_value(), "secret_key": o.secret_access_key.get_secret_value()}
            if o.has_keys else {})
    return pyarrow.fs.S3FileSystem(
        **keys, endpoint_override=url,
        scheme="http" if url and url.startswith("http://") else "https",
        region=o.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=5, request_timeout=30,
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=RETRIES))


def resolve(uri: str, options: S3Options | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """``(filesystem, path)`` for ``s3://bucket/prefix`` or a local path (made absolute)."""
    if is_s3(uri):
        return s3_filesystem(options), uri.removeprefix("s3://").rstrip("/")
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme; use a local path or s3://bucket/prefix")
    return pyarrow.fs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


_REASONS = [
    (r"NoSuchBucket|bucket does not exist|Bucket .* does not exist", "bucket does not exist"),
    (r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|ACCESS_DENIED|Forbidden|HTTP response code: 403"
     r"|InvalidToken|ExpiredToken|No response body",
     "access denied"),
    (r"curlCode: (6|7|28)|Couldn't connect|Could not resolve|Connection refused|timed out|Timeout",
     "cannot reach the endpoint"),
]


def explain(uri: str, err: BaseException, options: S3Options | None = None) -> StorageError:
    """A one-line ``StorageError`` for an error raised while touching ``uri``; secrets masked."""
    o = options or S3Options()
    text = str(err)
    for pattern, reason in _REASONS:
        if re.search(pattern, text):
            if reason == "cannot reach the endpoint":
                reason += f" {endpoint(o.endpoint_url) or 'AWS S3'} (check data.endpoint_url / AWS_ENDPOINT_URL)"
            elif reason == "access denied":
                reason += (": check data.access_key_id / data.secret_access_key" if o.has_keys else
                           ": check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")
            return StorageError(o.scrub(f"{uri}: {reason}"))
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return StorageError(o.scrub(f"{uri}: {first}"))


def check_readable(uri: str, options: S3Options | None = None) -> None:
    """Raise ``StorageError`` unless ``uri`` (file or folder) exists and can be read."""
    fs, path = resolve(uri, options)
    try:
        if is_s3(uri):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
                raise StorageError(f"{uri}: bucket does not exist")
        info = fs.get_file_info(path)
    except StorageError:
        raise
    except OSError as err:
        raise explain(uri, err, options) from None
    if info.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"{uri}: not found")


def check_writable(uri: str, options: S3Options | None = None) -> None:
    """Raise ``StorageError`` unless an object can be written (and removed) under ``uri``."""
    fs, path = resolve(uri, options)
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
        raise explain(uri, err, options) from None
