"""Separate S3 credentials: the data prefix read with its own read-only key pair (``RAYSSL_DATA_*``),
the runs written with the AWS chain's read-write one, against a real moto server that checks every
key and its IAM policy (read-only on ``data/``, read-write on ``runs/``). No Ray cluster."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import boto3
import pytest
import torch

from rayssl import checkpoint as checkpoints
from rayssl.config import ConfigError, load_config
from rayssl.data import storage
from rayssl.data.datasets import sources
from rayssl.eval.backbone import read_checkpoint
from rayssl.train.launch import storage as run_storage
from test_storage import _unauthenticated_requests

DATA_PAIR = "RAYSSL_DATA_ACCESS_KEY_ID / RAYSSL_DATA_SECRET_ACCESS_KEY"


@dataclass(frozen=True)
class Keys:
    key_id: str = field(repr=False)
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def values(self) -> list[str]:
        return [v for v in (self.key_id, self.secret, self.token) if v]


@dataclass(frozen=True)
class Bucket:
    """The strict server's endpoint, its bucket (``data/train``, ``data/eval`` shards' manifests),
    the read-only key pair of the data, the read-write one of the runs, and temporary credentials
    (with a session token) of a read-only role."""

    endpoint: str
    name: str
    reader: Keys
    writer: Keys
    role: Keys


def _policy(bucket: str, prefix: str, actions: list[str]) -> str:
    """``actions`` on the objects under ``prefix``, listing the bucket (moto checks a HEAD of the
    bucket as ``s3:HeadBucket``; AWS as ``s3:ListBucket``)."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:HeadBucket"], "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Action": actions, "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*"}]})


def _user(iam, name: str, policy: str) -> Keys:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=policy)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return Keys(key["AccessKeyId"], key["SecretAccessKey"])


def _role(setup: dict, name: str, policy: str) -> Keys:
    iam = boto3.client("iam", **setup)
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName=name, PolicyName="s3", PolicyDocument=policy)
    creds = boto3.client("sts", **setup).assume_role(RoleArn=arn, RoleSessionName="rayssl-test")["Credentials"]
    return Keys(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"])


@pytest.fixture(scope="module")
def bucket(strict_s3_server) -> Bucket:
    """Set up unchecked, then the server checks every request again (as in test_storage.py)."""
    name = f"bkt-{uuid.uuid4().hex[:8]}"
    setup = {"endpoint_url": strict_s3_server, "region_name": "us-east-1",
             "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    read, write = (_policy(name, "data", ["s3:GetObject"]),
                   _policy(name, "runs", ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]))
    _unauthenticated_requests(strict_s3_server, 1000)
    try:
        s3 = boto3.client("s3", **setup)
        s3.create_bucket(Bucket=name)
        for split, n in (("train", 20), ("eval", 10)):
            s3.put_object(Bucket=name, Key=f"data/{split}/manifest.json",
                          Body=json.dumps({"format_version": 1, "num_images": n, "shards": []}).encode())
        iam = boto3.client("iam", **setup)
        reader, writer = _user(iam, "data-reader", read), _user(iam, "runs-writer", write)
        role = _role(setup, "data-reader-role", read)
    finally:
        _unauthenticated_requests(strict_s3_server, 0)
    return Bucket(strict_s3_server, name, reader, writer, role)


def _env(monkeypatch, runs: Keys, data: Keys | None) -> None:
    """The runs' pair in the AWS chain (``AWS_*``), the data's in ``RAYSSL_DATA_*`` (None: unset)."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", *storage.DATA_KEYS, storage.DATA_TOKEN):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", runs.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", runs.secret)
    if data is not None:
        for var, value in zip((*storage.DATA_KEYS, storage.DATA_TOKEN), (data.key_id, data.secret, data.token)):
            if value:
                monkeypatch.setenv(var, value)


def _config(bucket: Bucket):
    return load_config(None, [f"data.source=s3://{bucket.name}/data/train",
                              f"data.eval_source=s3://{bucket.name}/data/eval",
                              f"data.endpoint_url={bucket.endpoint}", f"run.storage_path=s3://{bucket.name}/runs",
                              "run.name=separate"])


def test_the_data_is_read_with_its_own_pair(bucket, monkeypatch) -> None:
    """The runs' pair may not read the data prefix: the read succeeds only with RAYSSL_DATA_*."""
    cfg = _config(bucket)
    _env(monkeypatch, runs=bucket.writer, data=bucket.reader)
    train_uri, train, eval_uri, evaluation = sources(cfg.data)
    assert (train_uri, train["num_images"], evaluation["num_images"]) == (cfg.data.source, 20, 10)

    _env(monkeypatch, runs=bucket.writer, data=None)  # the AWS chain: the runs' pair, refused on data/
    with pytest.raises(storage.StorageError) as err:
        sources(cfg.data)
    assert str(err.value) == (f"data.source: {cfg.data.source}: access denied: check the AWS credentials "
                              "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE)")


def test_the_runs_are_written_with_the_aws_chain(bucket, monkeypatch, tmp_path) -> None:
    """Ray Train's storage filesystem and the checkpoint reads use the AWS chain's read-write pair
    while RAYSSL_DATA_* holds the data's read-only one."""
    cfg = _config(bucket)
    _env(monkeypatch, runs=bucket.writer, data=bucket.reader)
    path, fs = run_storage(cfg)  # run.storage_path checked writable, as before every launch
    folder = f"{path}/separate/checkpoint_000001"
    checkpoints.save({"teacher": {"w": torch.ones(2)}, "config": {}, "meta": {}, "step": 1}, tmp_path)
    fs.create_dir(folder)
    for name in (checkpoints.CHECKPOINT_FILE, checkpoints.MANIFEST_FILE):  # as rayssl.train.loop.upload does
        with fs.open_output_stream(f"{folder}/{name}") as f:
            f.write((tmp_path / name).read_bytes())
    state = read_checkpoint(f"s3://{bucket.name}/runs/separate", storage.S3Options.for_runs(cfg.data))
    assert state["step"] == 1 and torch.equal(state["teacher"]["w"], torch.ones(2))


def test_the_data_pair_cannot_write(bucket, monkeypatch) -> None:
    """The separation is real: the data's pair is refused a write, on the runs and on the data
    prefix, and the error names the variables to check, never their values."""
    cfg = _config(bucket)
    _env(monkeypatch, runs=bucket.writer, data=bucket.reader)
    data = storage.S3Options.for_data(cfg.data)
    for uri in (f"s3://{bucket.name}/runs", f"s3://{bucket.name}/data/train"):
        with pytest.raises(storage.StorageError) as err:
            storage.check_writable(uri, data)
        assert str(err.value) == f"{uri}: access denied: check {DATA_PAIR}"
        assert not any(v in str(err.value) for v in bucket.reader.values)
    storage.check_writable(f"s3://{bucket.name}/runs", storage.S3Options.for_runs(cfg.data))


def test_a_session_token_goes_with_the_data_pair(bucket, monkeypatch) -> None:
    """Temporary credentials (a read-only role's) work with RAYSSL_DATA_SESSION_TOKEN and are
    refused without it."""
    cfg = _config(bucket)
    _env(monkeypatch, runs=bucket.writer, data=bucket.role)
    data = storage.S3Options.for_data(cfg.data)
    assert sources(cfg.data)[1]["num_images"] == 20
    assert not any(v in repr(data) for v in bucket.role.values)
    with pytest.raises(storage.StorageError, match=f"access denied: check {DATA_PAIR}$"):
        storage.check_writable(f"s3://{bucket.name}/runs", data)

    monkeypatch.delenv(storage.DATA_TOKEN)
    with pytest.raises(storage.StorageError) as err:
        sources(cfg.data)
    assert str(err.value) == f"data.source: {cfg.data.source}: access denied: check {DATA_PAIR}"


@pytest.mark.parametrize("given, missing", [(0, 1), (1, 0)])
def test_half_a_data_pair_names_the_missing_variable(given: int, missing: int, monkeypatch) -> None:
    for var in (*storage.DATA_KEYS, storage.DATA_TOKEN):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(storage.DATA_KEYS[given], "s3cr3t-value")
    data = load_config(None, []).data
    with pytest.raises(ConfigError) as err:
        storage.S3Options.for_data(data)
    assert str(err.value) == (f"{storage.DATA_KEYS[missing]}: not set while {storage.DATA_KEYS[given]} is; "
                              "set both, or neither to use the AWS credential chain")
    assert not storage.S3Options.for_runs(data).has_keys  # the runs never read RAYSSL_DATA_*
    config_keys = load_config(None, ["data.access_key_id=AKIDCONFIG", "data.secret_access_key=config-secret"]).data
    assert storage.S3Options.for_data(config_keys).keys_from == storage.CONFIG_KEYS  # the config's keys win

    monkeypatch.delenv(storage.DATA_KEYS[given])
    monkeypatch.setenv(storage.DATA_TOKEN, "t0ken-value")
    with pytest.raises(ConfigError) as err:
        storage.S3Options.for_data(data)
    assert str(err.value).startswith(f"{storage.DATA_TOKEN}: set without {DATA_PAIR}")
    assert "\n" not in str(err.value) and "t0ken" not in str(err.value)


def test_without_a_data_pair_data_and_runs_share_the_options(monkeypatch) -> None:
    """Backwards compatible: no RAYSSL_DATA_* variable, one set of options as before."""
    for var in (*storage.DATA_KEYS, storage.DATA_TOKEN):
        monkeypatch.delenv(var, raising=False)
    for overrides in ([], ["data.access_key_id=AKIDCONFIG", "data.secret_access_key=config-secret"]):
        data = load_config(None, ["data.endpoint_url=http://127.0.0.1:1", *overrides]).data
        assert storage.S3Options.for_data(data) == storage.S3Options.for_runs(data)


def test_the_data_keys_stay_out_of_reprs_and_messages(monkeypatch) -> None:
    keys = Keys("AKIDDATAEXAMPLE", "d4ta/s3cr3t", "t0ken/value")
    monkeypatch.setenv(storage.DATA_KEYS[0], keys.key_id)
    monkeypatch.setenv(storage.DATA_KEYS[1], keys.secret)
    monkeypatch.setenv(storage.DATA_TOKEN, keys.token)
    data = storage.S3Options.for_data(load_config(None, ["data.endpoint_url=http://127.0.0.1:1"]).data)
    assert data.has_keys and data.session_token.get_secret_value() == keys.token
    text = repr(data) + str(data)
    odd = storage.explain("s3://b/p", OSError(f"odd failure for {keys.key_id}, {keys.secret}, {keys.token}"), data)
    assert str(odd) == "s3://b/p: odd failure for ***, ***, ***"
    assert not any(v in text for v in keys.values)
