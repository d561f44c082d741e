"""Training images/s of the same 2 workers on two Ray nodes (SPREAD) and on one node.

    python benchmarks/nodes_throughput.py                  # the default recipe, 2 epochs of 20k images
    python benchmarks/nodes_throughput.py train.epochs=4

Each arm starts its own multi-node Ray cluster on this host (``ray.cluster_utils.Cluster``): a
head with 2 logical CPUs for Ray Data and the controller, plus either two worker nodes with one
``trainer`` resource each (the workers land on different nodes: gloo all-reduces cross raylets)
or one worker node with two (both workers on it). Everything else is equal: shards and
checkpoints in s3:// on a moto server (nodes share no disk), tracking off. On one host this
measures what crossing nodes costs, not a speed-up. Prints the median images/s of the logged
windows after the first, per arm, and writes ``docs/benchmarks/nodes_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs/benchmarks/nodes_throughput.json"


def arm(nodes: int, overrides: list[str]) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from rayssl.config import load_config
    from rayssl.train.launch import pretrain

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for i in range(nodes):
        cluster.add_node(num_cpus=2 // nodes, resources={"trainer": 2 // nodes})
    ray.init(address=cluster.address)
    try:
        cfg = load_config(ROOT / "configs/fashion_mnist.yaml", [
            "data.source=s3://bench/fm/train", "data.eval_source=s3://bench/fm/test", "data.train_limit=20000",
            "train.epochs=2", "train.time_budget=null", "eval.baselines=false", "tracking.enabled=false", "run.storage_path=s3://bench/runs",
            f"run.name=nodes{nodes}-{int(time.time())}", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
            "scaling.worker_resources={trainer: 1}", "scaling.placement_strategy=SPREAD", *overrides])
        started = time.time()
        out = pretrain(cfg)
        rates = [m["images_per_second"] for m in out["history"][1:]]
        return {"nodes": nodes, "median_images_per_second": statistics.median(rates), "min": min(rates),
                "wall_seconds": time.time() - started, "train_seconds": out["train_seconds"],
                "steps": out["history"][-1]["step"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both arms")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="rayssl-nodes-")
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    from rayssl.data.shards import make_shards

    boto3.client("s3").create_bucket(Bucket="bench")
    for split in ("train", "test"):
        make_shards("/usr/share/datasets/fashion-mnist", f"s3://bench/fm/{split}", split=split, min_shards=8,
                    progress=lambda line: None)
    import ray

    ray.shutdown()  # the single-node Ray that wrote the shards; each arm starts its own cluster
    results = [arm(2, args.overrides), arm(1, args.overrides)]
    results[0]["ratio_to_one_node"] = results[0]["median_images_per_second"] / results[1]["median_images_per_second"]
    print(json.dumps(results, indent=1))
    OUT.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "overrides": args.overrides, "arms": results},
                              indent=1) + "\n")
    server.stop()


if __name__ == "__main__":
    main()
