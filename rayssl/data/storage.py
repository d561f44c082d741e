"""Object storage at the edge: a local path or ``s3://bucket/prefix`` as a pyarrow filesystem.

``S3Options`` says how to reach S3, with two sets of credentials, so that the data prefix can be
read with a read-only key and the runs written with a read-write one:

- the data (``data.source``, ``data.eval_source``: their manifests and shards),
  ``S3Options.for_data(cfg.data)``: ``data.access_key_id``/``data.secret_access_key`` when set,
  else ``RAYSSL_DATA_ACCESS_KEY_ID``/``RAYSSL_DATA_SECRET_ACCESS_KEY`` (and
  ``RAYSSL_DATA_SESSION_TOKEN``, if any) from the environment of the process that builds the
  options (the driver: Ray's tasks get the keys inside the filesystem), else the standard AWS chain;
- the runs (``run.storage_path``: checkpoints, the run folder, Ray Train's storage filesystem),
  ``S3Options.for_runs(cfg.data)``: ``data.access_key_id``/``data.secret_access_key`` when set,
  else the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
  instance role), never the ``RAYSSL_DATA_*`` pair.

Without any ``RAYSSL_DATA_*`` variable both are the same. Both take an endpoint for MinIO / Ceph /
other S3-compatible stores (``data.endpoint_url`` or ``AWS_ENDPOINT_URL``), a region
(``data.region``, ``AWS_REGION``, ``AWS_DEFAULT_REGION``) and retries with exponential backoff for
transient errors. The shards written by ``jobs/make_shards.py`` use the AWS chain. Failures become
a ``StorageError``: one line naming the URI and saying what to fix (refused keys: the settings
they came from), raised before any training starts; it never contains a secret. A key pair
given half (one of the two variables) is a ``ConfigError`` naming the missing one.

During a run, an outage (refused or cut connections, timeouts, 5xx answers) is ridden out:
``ride_out`` (or ``Outage`` for a read that resumes where it stopped) retries with backoff from
``BACKOFF[0]`` up to ``BACKOFF[1]`` seconds between tries, for at most ``data.outage_limit_s``
seconds from the first failure; past it, a ``StorageOutage`` names the bucket, the endpoint and
what to check. The shard reads of the training stream and the checkpoint uploads and reads of
``rayssl.train.loop`` go through it; the AWS SDK's own retries (``RETRIES``) cover short blips.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow
import pyarrow.fs
from pydantic import SecretStr

from rayssl.config import MASK, ConfigError, DataConfig, mask_uri
from rayssl.errors import find_cause

RETRIES = 5  # attempts of the AWS SDK for one request (its own backoff: a few seconds in all)
BACKOFF = (0.5, 4.0)  # seconds between tries through an outage: the first wait, the longest
OUTAGE_LIMIT_S = 120.0  # data.outage_limit_s's default
CONFIG_KEYS = ("data.access_key_id", "data.secret_access_key")
DATA_KEYS = ("RAYSSL_DATA_ACCESS_KEY_ID", "RAYSSL_DATA_SECRET_ACCESS_KEY")  # the data's own pair (env)
DATA_TOKEN = "RAYSSL_DATA_SESSION_TOKEN"  # with DATA_KEYS: temporary credentials (STS)
AWS_CHAIN = "the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"

log = logging.getLogger(__name__)


class StorageError(ConfigError):
    """A missing bucket or object, refused credentials or an unreachable endpoint (one line)."""


class StorageOutage(StorageError):
    """Object storage stayed unreachable or unavailable past ``data.outage_limit_s`` during a run;
    one line naming the bucket, the endpoint and what to check."""


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: endpoint, region and, optionally, a static key pair (and session token).

    Without keys the AWS SDK's default chain applies on each node. The keys are held as
    ``SecretStr`` and left out of ``repr``; they only leave this object inside a pyarrow
    ``S3FileSystem`` (which Ray pickles to its tasks). Both keys or neither (``ConfigError``
    naming the missing one of ``keys_from``, the settings they were read from). Build them with
    ``for_data`` or ``for_runs``.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = field(default=None, repr=False)
    secret_access_key: SecretStr | None = field(default=None, repr=False)
    outage_limit_s: float = OUTAGE_LIMIT_S  # how long an outage is ridden out during a run
    session_token: SecretStr | None = field(default=None, repr=False)
    keys_from: tuple[str, str] = field(default=CONFIG_KEYS, repr=False)  # where the keys were set, for messages

    def __post_init__(self) -> None:
        for name in ("access_key_id", "secret_access_key", "session_token"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, SecretStr(value))
        given = dict(zip(self.keys_from, (bool(self.access_key_id), bool(self.secret_access_key))))
        if len(set(given.values())) > 1:
            missing, present = sorted(given, key=given.get)
            raise ConfigError(f"{missing}: not set while {present} is; set both, or neither "
                              "to use the AWS credential chain")

    @classmethod
    def for_data(cls, data: DataConfig) -> S3Options:
        """The options for reading ``data.source`` and ``data.eval_source``: the config's keys when
        set, else the ``RAYSSL_DATA_*`` pair of this process's environment when set (``DATA_KEYS``,
        ``DATA_TOKEN``), else the AWS chain: without ``RAYSSL_DATA_*``, the options of ``for_runs``.
        ``ConfigError`` naming the missing one of a half pair."""
        key_id, secret, token = (os.environ.get(name) or None for name in (*DATA_KEYS, DATA_TOKEN))
        if data.access_key_id or data.secret_access_key or not (key_id or secret or token):
            return cls.for_runs(data)
        if not (key_id or secret):
            raise ConfigError(f"{DATA_TOKEN}: set without {DATA_KEYS[0]} / {DATA_KEYS[1]}; set them too, "
                              "or unset it to use the AWS credential chain")
        return cls(data.endpoint_url, data.region, key_id, secret, data.outage_limit_s, token, DATA_KEYS)

    @classmethod
    def for_runs(cls, data: DataConfig) -> S3Options:
        """The options for ``run.storage_path`` (checkpoints, the run folder, Ray Train's storage
        filesystem): the config's keys when set, else the AWS chain; never the ``RAYSSL_DATA_*``
        pair (``ConfigError`` if only one config key is set)."""
        return cls(data.endpoint_url, data.region, data.access_key_id, data.secret_access_key,
                   data.outage_limit_s)

    @property
    def has_keys(self) -> bool:
        return self.access_key_id is not None and bool(self.access_key_id.get_secret_value())

    @property
    def credentials(self) -> str:
        """The credentials to check when S3 refuses these options: the keys' settings, else the AWS chain."""
        return " / ".join(self.keys_from) if self.has_keys else AWS_CHAIN

    def scrub(self, text: str) -> str:
        """``text`` with the keys and token (and any ``user:password@`` in URIs) replaced by ``***``."""
        for secret in (self.session_token, self.secret_access_key, self.access_key_id):
            if secret:
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
    if o.has_keys and o.session_token:
        keys["session_token"] = o.session_token.get_secret_value()
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
    (r"HTTP status 5\d\d|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE", "unavailable"),  # before "No response body"
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
            where = endpoint(o.endpoint_url) or "AWS S3"
            if reason == "cannot reach the endpoint":
                reason += f" {where} (check data.endpoint_url / AWS_ENDPOINT_URL)"
            elif reason == "unavailable":
                reason = (f"the endpoint {where} answers 'service unavailable' "
                          "(check data.endpoint_url / AWS_ENDPOINT_URL)")
            elif reason == "access denied":
                reason += f": check {o.credentials}"
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


_TRANSIENT = re.compile(r"NETWORK_CONNECTION|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|HTTP status 5\d\d"
                        r"|curlCode|[Cc]ould ?n[o']t connect|Connection (refused|reset)|timed out|Timeout"
                        r"|ServiceUnavailable|SlowDown|InternalError")
_SYMPTOMS = [(r"HTTP status 5\d\d|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|ServiceUnavailable|SlowDown",
              "answering 'service unavailable'"),
             (r"curlCode: 7\b|[Cc]ould ?n[o']t connect|Connection refused", "refusing connections"),
             (r"curlCode: 28\b|timed out|Timeout", "timing out")]


def transient(err: BaseException) -> bool:
    """Whether a storage error may pass by itself: a refused or cut connection, a timeout, a 5xx
    answer (not a missing object or bucket, nor refused credentials)."""
    return (isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
            and bool(_TRANSIENT.search(str(err))))


def bucket_of(uri: str) -> str:
    """``s3://bucket/a/b`` or ``bucket/a/b`` (a resolved S3 path) -> ``bucket``."""
    return uri.removeprefix("s3://").split("/", 1)[0]


class Outage:
    """Backoff through one outage of ``uri`` while ``doing`` something (``"reading shards"``).

    After a failed try, ``failed(err)`` waits before the next (``BACKOFF``, doubling, never past
    the limit) when ``err`` is ``transient``, and raises ``StorageOutage`` once
    ``options.outage_limit_s`` seconds have passed since the outage's first failure; any other
    error is raised as it is. ``ok()`` after a successful try ends the outage (the next failure
    starts a new one). The first failure and the recovery are logged (one line each).
    """

    def __init__(self, uri: str, options: S3Options | None, doing: str,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.uri = uri if "://" in uri else f"s3://{uri}"
        self.options, self.doing, self.sleep = options or S3Options(), doing, sleep
        self.started: float | None = None
        self.wait = BACKOFF[0]
        self.lasted = 0.0  # seconds the last outage lasted, once over

    def failed(self, err: OSError) -> None:
        if not transient(err):
            raise err
        now, limit = time.monotonic(), self.options.outage_limit_s
        if self.started is None:
            self.started = now
            log.warning("[rayssl] %s: object storage %s while %s; retrying for up to %g s (data.outage_limit_s)",
                        self.options.scrub(self.uri), symptom(err), self.doing, limit)
        if now - self.started >= limit:
            raise self.error(err, now - self.started) from None
        self.sleep(min(self.wait, self.started + limit - now))
        self.wait = min(2 * self.wait, BACKOFF[1])

    def ok(self) -> None:
        if self.started is not None:
            self.lasted = time.monotonic() - self.started
            log.warning("[rayssl] %s: object storage back after %.0f s; %s goes on",
                        self.options.scrub(self.uri), self.lasted, self.doing)
        self.started, self.wait = None, BACKOFF[0]

    def error(self, err: BaseException, seconds: float) -> StorageOutage:
        """The one line past the limit: the URI, the symptom, the limit, the bucket and what to check."""
        o, bucket = self.options, bucket_of(self.uri)
        where = endpoint(o.endpoint_url) or "AWS S3"
        return StorageOutage(o.scrub(
            f"{self.uri}: object storage {symptom(err)} for {seconds:.0f} s while {self.doing}, past "
            f"data.outage_limit_s={o.outage_limit_s:g}; check that bucket '{bucket}' is reachable: the endpoint "
            f"{where} (data.endpoint_url / AWS_ENDPOINT_URL), the credentials (data.access_key_id or the AWS "
            f"chain), the network"))


def symptom(err: BaseException) -> str:
    """What a transient error looks like, in a few words (``refusing connections``, ...)."""
    text = str(err)
    return next((words for pattern, words in _SYMPTOMS if re.search(pattern, text)), "cutting connections")


def ride_out(action: Callable[[], object], uri: str, options: S3Options | None, doing: str):
    """``action()``, tried again through a storage outage (``Outage``) until it succeeds or the
    outage passes ``data.outage_limit_s`` (``StorageOutage``); other errors are raised at once."""
    outage = Outage(uri, options, doing)
    while True:
        try:
            result = action()
        except OSError as err:
            outage.failed(err)
            continue
        outage.ok()
        return result


class _Upload(io.RawIOBase):
    """An output stream of ``RidingOut``: written to memory, uploaded on ``close`` as one action,
    so the whole upload (open, write, close) is tried again through an outage."""

    def __init__(self, handler: RidingOut, path: str, metadata) -> None:
        super().__init__()
        self.handler, self.path, self.metadata, self.buffer = handler, path, metadata, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def close(self) -> None:
        if not self.closed:
            data = self.buffer.getvalue()

            def put() -> None:
                with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as f:
                    f.write(data)

            try:
                self.handler.call(put, self.path, "writing")
            finally:
                super().close()


class RidingOut(pyarrow.fs.FileSystemHandler):
    """A pyarrow filesystem handler over ``fs`` that rides out outages (``ride_out``) on every call:
    for Ray Train's own writes and reads of the run folder (its checkpoint registry, old
    checkpoints' deletion), which would otherwise end the run at the first refused request.
    Input streams are read whole on open (small files: the registry, a checkpoint being
    restored); output streams are uploaded whole on close. Build it with ``riding_out``."""

    def __init__(self, fs: pyarrow.fs.FileSystem, options: S3Options | None) -> None:
        self.fs, self.options = fs, options or S3Options()

    def call(self, action: Callable[[], object], path: str, doing: str):
        return ride_out(action, path if "://" in path else f"s3://{path}", self.options, f"{doing} the run folder")

    def __eq__(self, other) -> bool:
        return isinstance(other, RidingOut) and self.fs.equals(other.fs)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"rayssl-riding-out+{self.fs.type_name}"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]):
        return self.call(lambda: self.fs.get_file_info(paths), paths[0] if paths else "", "reading")

    def get_file_info_selector(self, selector):
        return self.call(lambda: self.fs.get_file_info(selector), selector.base_dir, "listing")

    def create_dir(self, path: str, recursive: bool) -> None:
        self.call(lambda: self.fs.create_dir(path, recursive=recursive), path, "writing")

    def delete_dir(self, path: str) -> None:
        self.call(lambda: self.fs.delete_dir(path), path, "deleting in")

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.call(lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok), path, "deleting in")

    def delete_root_dir_contents(self) -> None:
        raise OSError("rayssl never deletes a bucket's whole contents")

    def delete_file(self, path: str) -> None:
        self.call(lambda: self.fs.delete_file(path), path, "deleting in")

    def move(self, src: str, dest: str) -> None:
        self.call(lambda: self.fs.move(src, dest), src, "writing")

    def copy_file(self, src: str, dest: str) -> None:
        self.call(lambda: self.fs.copy_file(src, dest), src, "writing")

    def open_input_stream(self, path: str):
        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        return pyarrow.BufferReader(self.call(read, path, "reading"))

    def open_input_file(self, path: str):
        return pyarrow.BufferReader(self.call(lambda: self.fs.open_input_file(path).read(), path, "reading"))

    def open_output_stream(self, path: str, metadata):
        return pyarrow.PythonFile(_Upload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self.call(lambda: self.fs.open_append_stream(path, metadata=metadata), path, "writing")


def unwrapped(fs: pyarrow.fs.FileSystem) -> pyarrow.fs.FileSystem:
    """The filesystem under a ``riding_out`` one (for a caller that rides out outages itself)."""
    handler = getattr(fs, "handler", None)
    return handler.fs if isinstance(handler, RidingOut) else fs


def uri_of(fs: pyarrow.fs.FileSystem, path: str) -> str:
    """``path`` on ``fs`` as a user writes it: ``s3://bucket/...`` on S3 (riding out or not)."""
    s3 = "s3" in fs.type_name.split("+")[-1]
    return f"s3://{path}" if s3 and not path.startswith("s3://") else path


def riding_out(fs: pyarrow.fs.FileSystem, options: S3Options | None) -> pyarrow.fs.FileSystem:
    """``fs`` (an S3 filesystem) riding out outages up to ``options.outage_limit_s``
    (``RidingOut``); a local filesystem as it is. For ``RunConfig(storage_filesystem=...)``."""
    if not isinstance(fs, pyarrow.fs.S3FileSystem):
        return fs
    return pyarrow.fs.PyFileSystem(RidingOut(fs, options))


def find_outage(err: BaseException | None) -> StorageOutage | None:
    """The ``StorageOutage`` behind an error raised by Ray (a failed training worker, a Ray Data
    task), found by type in its causes and worker failures, or by its one line in their text."""
    return find_cause(err, StorageOutage,
                      r"(s3://\S+: object storage [^\n]*? past data\.outage_limit_s=\S+; check [^\n]*?, the network)")
