"""``TrainRun`` stays an orchestrator: its parts (data cursor, metrics window, budget clock,
checkpoints, k-NN) live in their own modules, and the driver's payload to the workers is typed."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

from pydantic import SecretStr

from rayssl.config import load_config
from rayssl.data.meta import DataMeta
from rayssl.tracking import MlflowRun
from rayssl.train.payload import WorkerPayload

ROOT = Path(__file__).resolve().parents[1]
MAX_METHODS = 12  # every def in the class body, private ones included


def class_methods(path: Path, name: str) -> list[str]:
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    return [n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_train_run_has_at_most_twelve_methods() -> None:
    methods = class_methods(ROOT / "rayssl/train/run.py", "TrainRun")
    assert len(methods) <= MAX_METHODS, f"TrainRun has {len(methods)} methods (at most {MAX_METHODS}): {methods}"


def test_the_worker_payload_is_frozen_typed_and_picklable_with_its_secrets_masked() -> None:
    """What the driver hands every worker pickles whole (Ray does), cannot be edited on the
    way, and shows no secret in its repr: the config's keys stay ``SecretStr``."""
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml", ["data.access_key_id=key-id",
                                                                   "data.secret_access_key=not-for-logs"])
    meta = DataMeta(num_train=4, num_eval=0, channels=1, image_size=28, classes=("a", "b"), mean=(0.5,), std=(0.5,))
    payload = WorkerPayload(config=cfg.model_dump(), meta=meta, mlflow_run=MlflowRun("sqlite:///m.db", "0" * 32),
                            steps_per_epoch=3, run_path="/runs/r", run_uri="/runs/r", filesystem=None,
                            job_started=1.0, stop_key="stop-r")
    assert dataclasses.is_dataclass(payload) and WorkerPayload.__dataclass_params__.frozen
    again = pickle.loads(pickle.dumps(payload))
    assert again == payload and again.meta == meta
    secret = again.config["data"]["secret_access_key"]
    assert isinstance(secret, SecretStr) and secret.get_secret_value() == "not-for-logs"
    assert "not-for-logs" not in repr(payload)
