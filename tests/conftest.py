"""Shared fixtures: one real local Ray cluster per test session, in temporary folders."""

from __future__ import annotations

import os
import tempfile

import pytest

from cluster_settings import SMALL, TEST_CLUSTER_ENV

_TMP = tempfile.mkdtemp(prefix="rayssl-tests-")
os.environ.setdefault("RAY_TMPDIR", os.path.join(_TMP, "ray"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Every test cluster (started by this process) inherits these; user runs keep Ray's (cluster_settings.py)
for _key, _value in TEST_CLUSTER_ENV.items():
    os.environ.setdefault(_key, _value)
os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
RAY_FIXTURES = {"ray_cluster", "shard_cache"}  # and every fixture that depends on them


def pytest_collection_modifyitems(items) -> None:
    """Mark ``ray`` every test that needs the Ray cluster (directly or through a fixture).
    ``make test-fast`` runs ``-m "not ray and not multinode and not slow"``, the inner loop (``slow``:
    marked by hand, see CONTRIBUTING.md); ``make test`` runs ``-m "ray or multinode"`` (the multi-node
    tests last, in a cluster of their own once the session's is shut down) and, beside it at a lower
    CPU priority, the fast tier with its slow tests."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if "ray_nodes" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.multinode)
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)  # their own cluster: last


_TIER_SECONDS: dict[str, list[float]] = {}  # tier -> [tests, seconds of setup + call + teardown]


def pytest_runtest_logreport(report) -> None:
    tier = "multinode" if "multinode" in report.keywords else "ray" if "ray" in report.keywords else "fast"
    tally = _TIER_SECONDS.setdefault(tier, [0, 0.0])
    tally[0] += report.when == "call"
    tally[1] += report.duration


def pytest_terminal_summary(terminalreporter) -> None:
    """One line per tier that ran: its tests and their seconds (setup, call and teardown: a
    module's cluster start counts in its tier). ``make test`` runs the Ray and multi-node tiers in one
    process; this line gives each its share (CONTRIBUTING.md's figures)."""
    for tier, (tests, seconds) in sorted(_TIER_SECONDS.items()):
        terminalreporter.write_line(f"[tiers] {tier}: {tests} tests, {seconds:.1f} s")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, with fake credentials in the env.

    Started before Ray so that Ray's workers inherit ``AWS_ENDPOINT_URL`` and the keys.
    Yields the endpoint URL.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A real local Ray (4 logical CPUs on 2 cores, as STACK.md advises), started once."""
    import ray

    ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> str:
    if not os.path.exists(os.path.join(FASHION_MNIST, "train-images-idx3-ubyte.gz")):
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist (make test does)")
    return FASHION_MNIST


@pytest.fixture(scope="module")
def strict_s3_server():
    """A second moto server that checks credentials (``INITIAL_NO_AUTH_ACTION_COUNT=0``).

    No IAM user exists on it, so every key pair is refused like a wrong one on AWS (a test
    module may create one through moto's /moto-api/reset-auth, see test_storage.py).
    Yields its endpoint URL; bounded start-up wait on 127.0.0.1 only.
    """
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start within 10 s")
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def small_fashion_mnist(fashion_mnist_dir) -> str:
    """The first 2,048 train and 512 test Fashion-MNIST images, in order, as IDX files (a folder
    named like the real one, so its classes are Fashion-MNIST's)."""
    from pathlib import Path

    from rayssl.data.fashion_mnist import _FILES, load_fashion_mnist
    from test_shards import write_idx

    root = os.path.join(_TMP, "small", "fashion-mnist")
    os.makedirs(root, exist_ok=True)
    for split, n in SMALL.items():
        images, labels = load_fashion_mnist(fashion_mnist_dir, split, n)
        for stem, array in zip(_FILES[split], (images, labels)):
            write_idx(Path(root, stem + ".gz"), array)
    return root


@pytest.fixture(scope="session")
def shard_cache(ray_cluster, small_fashion_mnist) -> list[str]:
    """The overrides of a Fashion-MNIST run on the small set: ``data.fashion_mnist_dir`` and a
    ``data.cache_dir`` holding its train/test shards, built once per session."""
    from rayssl.data.shards import make_shards

    cache = os.path.join(_TMP, "cache")
    for split in SMALL:
        make_shards(small_fashion_mnist, os.path.join(cache, "fashion-mnist", split), split=split, min_shards=8,
                    progress=lambda line: None)
    return [f"data.cache_dir={cache}", f"data.fashion_mnist_dir={small_fashion_mnist}"]


@pytest.fixture(scope="session")
def tiny_run(shard_cache, tmp_path_factory) -> tuple:
    """``(run folder, results)`` of one real tiny run (test_train_ray's ``TINY_RUN``), logged to the default
    SQLite store of its storage path; the evaluation tests read it, and test_faults compares
    its killed twin with it. Tests must not change its folder."""
    import uuid

    from rayssl.train.launch import pretrain
    from test_train_ray import TINY_RUN, tiny_config

    storage = tmp_path_factory.mktemp("runs")
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    return storage / name, pretrain(tiny_config(storage, shard_cache, name, *TINY_RUN))


@pytest.fixture(scope="session")
def mlflow_server():
    """A real ``mlflow server`` on 127.0.0.1 (``tests/mlflow_server.py``). Yields ``(uri, store_folder)``."""
    from pathlib import Path

    from mlflow_server import MlflowServer

    server = MlflowServer(Path(_TMP) / "mlflow-server")
    server.start()
    yield server.uri, str(server.root)
    server.stop()
