"""The stall watchdog without Ray: its limit, its line, and a TrainRun whose data stops coming."""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from rayssl.config import load_config
from rayssl.train import prefetch
from rayssl.train.prefetch import Ahead
from rayssl.train.run import TrainRun
from rayssl.train.worker import Worker
from rayssl.train.watchdog import STALL_FLOOR_S, StallError, describe, find_stall, stall_limit
from test_train_run import META, N, STEPS_PER_EPOCH, ROOT, config, data  # noqa: F401  (data: the module fixture)


def test_stall_limit_is_the_timeout_until_steps_are_timed_then_100_step_times() -> None:
    assert stall_limit(180, None) == 180
    assert stall_limit(180, 0.5) == 50  # 100 step times
    assert stall_limit(180, 0.01) == STALL_FLOOR_S  # never under the floor ...
    assert stall_limit(10, 0.01) == 10  # ... nor over the timeout
    assert stall_limit(180, 5.0) == 180


def test_describe_names_ray_data_tasks_that_fit_on_no_node() -> None:
    line = describe([({"CPU": 1.0}, 2)], [], [{"CPU": 0.5, "memory": 1e9}, {"CPU": 0.5}], data_cpus=1.0)
    assert line == ("Ray Data's tasks need 1 CPU each (2 waiting) and no node has 1 CPU free (at most 0.5): "
                    "lower data.cpus_per_task (to 0.5) or scaling.cpus_per_worker, or add a node")
    other = describe([({"CPU": 2.0, "GPU": 1.0}, 1)], [[{"CPU": 1.0}, {"CPU": 1.0}]], [{"CPU": 0.5}], 0.5)
    assert other.startswith("1 task(s) wait for 2 CPU, 1 GPU (the most CPU free on a node: 0.5); a worker group "
                            "waits for 2 bundle(s) of 1 CPU; 1 CPU: lower scaling.num_workers")
    assert describe([({"CPU": 1.0}, 2)], [], [{"CPU": 0.5}], 0.5).startswith(
        "2 task(s) wait for 1 CPU and no node has that free (at most 0.5): Ray Data's ask data.cpus_per_task=0.5")
    assert describe([], [], [{"CPU": 2.0}], 1.0).startswith("Ray has no pending resource demand")


def test_ahead_calls_waiting_while_the_consumer_waits_and_its_error_reaches_the_consumer(monkeypatch) -> None:
    monkeypatch.setattr(prefetch, "POLL_S", 0.05)
    never = threading.Event()

    def items():
        yield 1
        never.wait(30)  # the source stops delivering
        yield 2

    waited: list[float] = []

    def waiting(seconds: float) -> None:
        waited.append(seconds)
        if seconds > 0.3:
            raise StallError("stalled")

    ahead = Ahead(items(), lambda x: x * 10, depth=2, waiting=waiting)
    assert next(ahead) == 10
    with pytest.raises(StallError):
        next(ahead)
    never.set()
    ahead.close()
    assert len(waited) >= 3 and waited == sorted(waited) and 0.3 < waited[-1] < 2


def test_a_run_whose_data_stops_fails_with_the_pending_line_within_the_limit(data) -> None:  # noqa: F811
    """Two epochs of batches come, then none: the run stops at the stall limit with one line
    naming what is pending and what was kept, instead of waiting forever."""
    never, said, reports = threading.Event(), [], []

    def train_batches(seed: int, rows: int):
        order = np.random.default_rng(seed).permutation(N)
        for i in range(0, N - rows + 1, rows):
            yield {"image": data["train"][order[i:i + rows]]}
        never.wait(60)  # the stream never ends and never delivers again

    cfg = config("data.deterministic=false", "run.stall_timeout=2", "train.epochs=4")
    worker = Worker(train_batches, report=lambda metrics, state: reports.append(metrics["step"]),
                    say=said.append, pending=lambda: "Ray Data's tasks need 1 CPU each (1 waiting)")
    run = TrainRun(cfg, META, STEPS_PER_EPOCH, worker)
    started = time.time()
    with pytest.raises(StallError) as err:
        while (metrics := run.train_interval()) is not None:
            run.log(metrics)
    never.set()
    assert time.time() - started < 30
    line = str(err.value)
    assert "\n" not in line and line not in said  # the driver prints it, once
    assert re.fullmatch(rf"\[rayssl\] stalled: worker 0 got no batch for [23] s at step {STEPS_PER_EPOCH} \(limit 2 s, "
                        r"run.stall_timeout\): Ray Data's tasks need 1 CPU each \(1 waiting\); nothing saved after "
                        rf"the checkpoint of step {STEPS_PER_EPOCH}", line), line
    assert reports[-1] == STEPS_PER_EPOCH
    assert find_stall(RuntimeError(f"Training failed.\nWorker 0: {line}\nTraceback ...")).args[0] == line


def test_data_cpus_follow_fractional_workers() -> None:
    def cpus(*extra: str) -> float:
        return load_config(ROOT / "configs/fashion_mnist.yaml", list(extra)).data_cpus

    assert cpus("scaling.cpus_per_worker=0.5") == 0.5
    assert cpus("scaling.cpus_per_worker=4") == 1.0
    assert cpus("scaling.cpus_per_worker=0.5", "data.cpus_per_task=2") == 2.0
