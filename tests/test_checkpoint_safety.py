"""Checkpoints that cannot run code: every load is ``torch.load(weights_only=True)``.

A state file planted with a pickled object (its ``__reduce__`` creates a marker file), in a run
folder and in a bucket of a real moto server on 127.0.0.1, is refused by resume
(``rayssl.train.loop.restore``), ``jobs/evaluate.py`` and ``rayssl.load_backbone`` with one line
naming the file, and the marker never appears. A real run's state round-trips as tensors and
plain values; one that an older rayssl wrote (numpy scalars in the optimizer) is refused with its
upgrade command, which makes it load again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

import rayssl
from rayssl import checkpoint as checkpoints
from rayssl.checkpoint import CHECKPOINT_FILE, MANIFEST_FILE, UnsafeCheckpoint
from rayssl.data import storage
from rayssl.eval.backbone import read_checkpoint
from rayssl.train.loop import restore
from rayssl.train.payload import WorkerPayload
from rayssl.train.run import TrainRun
from test_train_run import META, STEPS_PER_EPOCH, config, data, worker  # noqa: F401  (data: the module fixture)

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "checkpoint_2026-12-05_00-00-07"
PLAIN = (str, int, float, bool, type(None))


class Planted:
    """A pickled object that creates the file ``marker`` when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "x")


@pytest.fixture(scope="module")
def trained(data) -> dict:  # noqa: F811
    """The state of a real run's last checkpoint (``TrainRun``, one epoch, in memory): weights,
    AdamW state (lr and weight decay numpy scalars, as the schedules set them), RNG, cursors."""
    states: list = []
    TrainRun(config("train.epochs=1"), META, STEPS_PER_EPOCH, worker(data, states, knn=False)).run()
    return [s for _, s in states if s is not None][-1]


def local_run(root: Path) -> tuple[str, Callable[[str, bytes], None]]:
    """A local run folder and a writer of files into it."""
    def put(name: str, raw: bytes) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(raw)
    return str(root.resolve()), put


def s3_run(endpoint: str) -> tuple[str, Callable[[str, bytes], None]]:
    """A run folder in a new bucket of the moto server and a writer of objects into it."""
    bucket, s3 = f"bkt-{uuid.uuid4().hex[:8]}", boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs/r", lambda name, raw: s3.put_object(Bucket=bucket, Key=f"runs/r/{name}", Body=raw)


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path) -> tuple[str, Callable[[str, bytes], None]]:
    """``(run folder URI, put)``: a local folder, or a prefix in a bucket on 127.0.0.1."""
    return local_run(tmp_path / "run") if request.param == "local" else s3_run(request.getfixturevalue("s3_server"))


def plant(put: Callable[[str, bytes], None], state: dict) -> None:
    """``torch.save(state)`` as ``FOLDER``'s state file, with the manifest that makes it intact
    (what an older rayssl wrote, or anyone who can write the run folder)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    raw = buffer.getvalue()
    put(f"{FOLDER}/{CHECKPOINT_FILE}", raw)
    put(f"{FOLDER}/{MANIFEST_FILE}", json.dumps({"step": state["step"], "bytes": len(raw),
                                                 "sha256": hashlib.sha256(raw).hexdigest()}).encode())


def assert_same(saved, loaded, where: str = "state") -> None:
    """``loaded`` equals ``saved``, made of tensors (same dtype, equal) and plain values only."""
    if isinstance(saved, torch.Tensor):
        assert type(loaded) is torch.Tensor and loaded.dtype == saved.dtype and torch.equal(loaded, saved), where
    elif isinstance(saved, (dict, list, tuple)):
        assert type(loaded) is type(saved) and len(loaded) == len(saved), where
        pairs = saved.items() if isinstance(saved, dict) else enumerate(saved)
        for key, value in pairs:
            assert_same(value, loaded[key], f"{where}[{key!r}]")
    else:
        assert type(loaded) in PLAIN and loaded == saved, where


def evaluate_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs/evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_the_planted_state_file_runs_code_when_unpickled(tmp_path) -> None:
    """The payload the other tests plant is live: loaded the old way, it creates its marker."""
    buffer = io.BytesIO()
    torch.save({"meta": Planted(tmp_path / "marker")}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert (tmp_path / "marker").exists()


def test_resume_evaluate_and_load_backbone_refuse_a_planted_checkpoint(run, tmp_path, capsys) -> None:
    """An intact checkpoint holding a pickled object, planted in the run folder: resume, the
    evaluate job (exit code 2), ``load_backbone`` (run folder, checkpoint folder, the file) and the
    upgrade all refuse it with one line naming the file, and nothing in it runs."""
    uri, put = run
    marker = tmp_path / "marker"
    plant(put, {"step": 7, "teacher": {"w": torch.zeros(2)}, "config": {}, "meta": Planted(marker)})
    file = f"{uri}/{FOLDER}/{CHECKPOINT_FILE}"
    line = (f"{file}: refused, not loaded: it holds pickled objects (io.open); "
            "a rayssl checkpoint holds tensors and plain values only")
    fs, path = storage.resolve(uri)
    payload = WorkerPayload(config={}, meta=META, mlflow_run=None, steps_per_epoch=STEPS_PER_EPOCH, run_path=path,
                            run_uri=uri, filesystem=fs, job_started=0.0)
    with pytest.raises(UnsafeCheckpoint) as err:
        restore(payload, say_skipped=print)
    assert str(err.value) == line
    with pytest.raises(SystemExit) as exit_:
        evaluate_job().main(["--checkpoint", uri])
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {line}\n"
    for where in (uri, f"{uri}/{FOLDER}", file):
        with pytest.raises(UnsafeCheckpoint, match=f"^{re.escape(line)}$"):
            rayssl.load_backbone(where)
    with pytest.raises(UnsafeCheckpoint, match=f"^{re.escape(line)}$"):
        checkpoints.upgrade(fs, f"{path}/{FOLDER}")
    assert not marker.exists()


def test_a_real_state_round_trips_as_tensors_and_plain_values(trained, tmp_path) -> None:
    """Saved and read back, a run's state is equal to what was saved (weights, optimizer, RNG,
    cursors, config), made of tensors and plain values: the numpy lr a Python float."""
    checkpoints.save(trained, tmp_path)
    loaded = read_checkpoint(str(tmp_path))
    assert_same(trained, loaded)
    assert loaded["optimizer"]["state"] and isinstance(loaded["rng"][0], torch.Tensor)
    assert type(trained["optimizer"]["param_groups"][0]["lr"]) is np.float64  # what save made plain
    assert type(loaded["optimizer"]["param_groups"][0]["lr"]) is float


def test_save_refuses_what_weights_only_would_not_load(tmp_path) -> None:
    for value, kind in ((np.zeros(3), "ndarray"), (Planted(tmp_path / "marker"), "Planted")):
        with pytest.raises(TypeError, match=rf"^state\['meta'\]\[0\]: a {kind} cannot go into a checkpoint"):
            checkpoints.save({"step": 1, "meta": [value]}, tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_older_checkpoint_is_refused_with_its_upgrade_which_makes_it_load(trained, s3_server) -> None:
    """A checkpoint as rayssl wrote it before (numpy scalars in the optimizer), in a bucket: one
    line naming the file and the command; that command rewrites it (manifest too) and it loads,
    equal to the state; run again, it changes nothing."""
    uri, put = s3_run(s3_server)
    plant(put, trained)
    folder = f"{uri}/{FOLDER}"
    with pytest.raises(UnsafeCheckpoint) as err:
        read_checkpoint(uri)
    assert str(err.value) == (f"{folder}/{CHECKPOINT_FILE}: written by an older rayssl (numpy scalars in its state), "
                              f"not loaded; upgrade it to tensors and plain values: "
                              f"python -m rayssl.checkpoint upgrade {folder}")
    command = str(err.value).rsplit(": ", 1)[1].split()
    proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"{folder}: upgraded (step {trained['step']})\n", proc.stderr
    assert_same(trained, read_checkpoint(uri))
    fs, path = storage.resolve(uri)
    assert checkpoints.upgrade(fs, f"{path}/{FOLDER}") == f"{folder}: already tensors and plain values, left as it is"
