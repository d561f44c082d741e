"""Object-storage errors against real S3-compatible servers on 127.0.0.1 (moto)."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid

import boto3
import pytest

from rayssl.config import load_config
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
            check("s3://some-bucket/data", storage.S3Options(strict_s3_server))
        assert "access denied" in _one_line_naming(err, "s3://some-bucket/data")


def _unauthenticated_requests(endpoint: str, count: int) -> None:
    """moto checks credentials once ``count`` requests have passed unchecked (its reset-auth API
    sets INITIAL_NO_AUTH_ACTION_COUNT and restarts the counter); 0 = check every request."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=str(count).encode(),
                                     headers={"Content-Type": "text/plain"}, method="POST")
    urllib.request.urlopen(request, timeout=10).close()


@pytest.fixture(scope="module")
def iam_user(strict_s3_server) -> tuple[str, str, str]:
    """``(bucket, access key id, secret)``: an IAM user allowed ``s3:*`` on the strict server and a
    bucket holding ``data/x``; set up unchecked, then the server checks every request again."""
    bucket = f"bkt-{uuid.uuid4().hex[:8]}"
    setup = {"endpoint_url": strict_s3_server, "region_name": "us-east-1",
             "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    _unauthenticated_requests(strict_s3_server, 1000)
    try:
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="rayssl-test")
        iam.put_user_policy(UserName="rayssl-test", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="rayssl-test")["AccessKey"]
        s3 = boto3.client("s3", **setup)
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="data/x", Body=b"hello")
    finally:
        _unauthenticated_requests(strict_s3_server, 0)
    return bucket, key["AccessKeyId"], key["SecretAccessKey"]


def test_config_keys_override_the_aws_chain(strict_s3_server, iam_user, monkeypatch) -> None:
    bucket, key_id, secret = iam_user
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong-env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-env-secret")
    uri = f"s3://{bucket}/data"
    with pytest.raises(storage.StorageError, match="access denied: check the AWS credentials"):
        storage.check_readable(uri, storage.S3Options(strict_s3_server))  # the env keys are refused

    cfg = load_config(None, [f"data.endpoint_url={strict_s3_server}", f"data.access_key_id={key_id}",
                             f"data.secret_access_key={secret}"])
    for s3 in (storage.S3Options.for_data(cfg.data), storage.S3Options.for_runs(cfg.data)):
        assert secret not in repr(s3) and key_id not in repr(s3)
        storage.check_readable(uri, s3)
        storage.check_writable(f"s3://{bucket}/out", s3)
        fs, path = storage.resolve(f"{uri}/x", s3)
        with fs.open_input_stream(path) as f:
            assert f.read() == b"hello"

    wrong = "wrong" + secret[5:]
    for bad in (storage.S3Options(strict_s3_server, None, key_id, wrong),
                storage.S3Options(strict_s3_server, None, wrong, wrong)):
        for check in (storage.check_readable, storage.check_writable):
            with pytest.raises(storage.StorageError) as err:
                check(uri, bad)
            msg = _one_line_naming(err, uri)
            assert msg == f"{uri}: access denied: check data.access_key_id / data.secret_access_key"
            assert wrong not in msg and secret not in msg


def test_explain_never_shows_the_keys() -> None:
    s3 = storage.S3Options("http://user:pw@127.0.0.1:1", None, "AKIDEXAMPLE", "s3cr3t/K3Y")
    err = storage.explain("s3://b/p", OSError("odd failure for AKIDEXAMPLE with s3cr3t/K3Y\ndetails"), s3)
    assert str(err) == "s3://b/p: odd failure for *** with ***"
    err = storage.explain("s3://b/p", OSError("curlCode: 7, Couldn't connect to server"), s3)
    assert "pw" not in str(err) and "user:***@127.0.0.1:1" in str(err)


def test_an_unavailable_endpoint_is_not_taken_for_refused_keys() -> None:
    """A 503 to a HEAD has no body ("No response body", as a 403 has): it must read as the
    endpoint's outage, never as wrong credentials."""
    s3 = storage.S3Options("http://127.0.0.1:1")
    head = OSError("When getting information for key 'x' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) "
                   "during HeadObject operation: No response body.")
    assert str(storage.explain("s3://b/x", head, s3)) == (
        "s3://b/x: the endpoint http://127.0.0.1:1 answers 'service unavailable' (check data.endpoint_url / "
        "AWS_ENDPOINT_URL)")
    assert storage.transient(head) and storage.symptom(head) == "answering 'service unavailable'"
    denied = OSError("AWS Error ACCESS_DENIED during HeadObject operation: HTTP response code: 403 No response body")
    assert "access denied" in str(storage.explain("s3://b/x", denied, s3)) and not storage.transient(denied)


def test_unreachable_endpoint_named(s3_server, monkeypatch) -> None:
    monkeypatch.setattr(storage, "RETRIES", 1)  # the SDK's 5 attempts and backoff: 9 s more, the same line
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(storage.StorageError) as err:
        storage.check_readable("s3://bkt/data", storage.S3Options(f"http://127.0.0.1:{port}"))
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


def test_wrong_credentials_stop_a_run_before_training(strict_s3_server, tmp_path) -> None:
    """Refused keys are found by the input checks, before Ray starts (no cluster needed)."""
    from pathlib import Path

    from rayssl.train.launch import pretrain

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/fashion_mnist.yaml", [
        "data.source=s3://shards/train", f"data.endpoint_url={strict_s3_server}",
        f"run.storage_path={tmp_path}", "run.name=denied"])
    with pytest.raises(storage.StorageError) as err:
        pretrain(cfg)
    assert str(err.value).startswith("data.source: s3://shards/train: access denied")
    assert not (tmp_path / "denied").exists()
