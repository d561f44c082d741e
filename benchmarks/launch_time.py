"""Seconds per launch of the Ray tier's tiny run: what most of `make test`'s Ray tests pay.

    python benchmarks/launch_time.py                 # 3 launches, Ray's defaults
    python benchmarks/launch_time.py --test-cluster  # the settings tests/conftest.py gives its clusters

One process: a moto S3 server and a local Ray as tests/conftest.py starts them (4 logical CPUs),
the small Fashion-MNIST (2,048 / 512 images) as shards, then ``--launches`` runs of
``tests/test_train_ray.py``'s ``TINY_RUN`` one after the other (12 steps of a width-8 ConvNet on 2
workers, a checkpoint every 3 steps, an online k-NN each epoch, the final k-NN and galleries).
The first launch meets a cold cluster; the later ones show what each further launch of a test
session costs. Prints one JSON line per launch. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cluster_settings import SMALL, TEST_CLUSTER_ENV  # noqa: E402  (tests/conftest.py's, for its clusters only)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launches", type=int, default=3)
    p.add_argument("--test-cluster", action="store_true", help=f"set {', '.join(TEST_CLUSTER_ENV)} as conftest does")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    args = p.parse_args()
    if args.test_cluster:
        os.environ.update(TEST_CLUSTER_ENV)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    import ray

    ray.init(num_cpus=4, object_store_memory=512 * 1024**2, include_dashboard=True, dashboard_host="127.0.0.1")
    from rayssl.data.fashion_mnist import _FILES, load_fashion_mnist
    from rayssl.data.shards import make_shards
    from rayssl.train.launch import pretrain
    from test_shards import write_idx
    from test_train_ray import TINY_RUN, tiny_config

    tmp = Path(tempfile.mkdtemp(prefix="launch-time-"))
    small, cache = tmp / "small" / "fashion-mnist", tmp / "cache"
    small.mkdir(parents=True)
    for split, n in SMALL.items():
        for stem, array in zip(_FILES[split], load_fashion_mnist(args.data_dir, split, n)):
            write_idx(small / f"{stem}.gz", array)
        make_shards(str(small), str(cache / "fashion-mnist" / split), split=split, min_shards=8, progress=lambda line: None)
    shards = [f"data.cache_dir={cache}", f"data.fashion_mnist_dir={small}"]
    for i in range(args.launches):
        started = time.perf_counter()
        out = pretrain(tiny_config(tmp, shards, f"tiny-{uuid.uuid4().hex[:6]}", *TINY_RUN))
        print(json.dumps({"launch": i, "seconds": round(time.perf_counter() - started, 1),
                          "knn": out["knn/teacher"], "test_cluster": args.test_cluster}), flush=True)
    ray.shutdown()
    server.stop()


if __name__ == "__main__":
    main()
