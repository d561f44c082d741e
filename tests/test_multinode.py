"""More than one Ray node: a real multi-node cluster on this host (``ray.cluster_utils.Cluster``,
the way Ray tests its own multi-node behaviour: each node its own raylet, object store and
worker processes). Nodes share no disk here by rule: shards and checkpoints live in s3:// (the
moto server), MLflow behind a real ``mlflow server``.

The cluster: a head with 2 CPUs (the driver's Ray Train controller and Ray Data tasks) and
two worker nodes with 1 CPU and one ``trainer`` resource each, plus a resource naming the
node. Runs here take training workers onto trainer nodes only (``scaling.worker_resources``) and
spread them (``scaling.placement_strategy=SPREAD``: the strategy of the workers' placement group).

These tests run last and in their own Ray cluster: the session's single-node cluster is shut down
first (``make test`` runs both tiers in one process).
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

import boto3
import pytest

from rayssl.config import ConfigError, load_config
from rayssl.data import storage
from rayssl.data.shards import make_shards
from rayssl.train.launch import pretrain
from test_train_ray import ROOT, checkpoints

TRAINER_NODES = 2


@pytest.fixture(scope="module")
def ray_nodes(s3_server, small_fashion_mnist):
    """``(cluster, bucket)``: the multi-node cluster, joined by this process, and a bucket
    holding the small Fashion-MNIST's shards."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a plain ``pytest``: the single-node session cluster is done by now
        ray.shutdown()
    # An elastic group first retries its old size and waits this long for its placement group (Ray's
    # default: 60 s); here a group that can be placed is placed within a second
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "5"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 256 * 1024**2, "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        # a lost node is declared dead after ~3 s instead of Ray's default ~30 s (test time only)
        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                           "health_check_failure_threshold": 3}})
    for i in range(TRAINER_NODES):
        cluster.add_node(num_cpus=1, resources={"trainer": 1, f"trainer{i}": 1}, object_store_memory=128 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=True)
    coordinator = quick_resource_view()
    bucket = f"nodes-{uuid.uuid4().hex[:6]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    for split in ("train", "test"):
        make_shards(small_fashion_mnist, f"s3://{bucket}/fm/{split}", split=split, min_shards=4,
                    progress=lambda line: None)
    yield cluster, bucket
    ray.kill(coordinator)  # detached: it would outlive the job
    ray.shutdown()
    cluster.shutdown()


def quick_resource_view():
    """Ray Train's elastic policy sizes a restart from the nodes that Ray Data's autoscaling
    coordinator (one detached actor per cluster) last saw, and the coordinator looks every 20 s: a
    lost node was still counted for ~20 s, so the run retried two workers until then, and a new
    node waited as long to be used. Created here first, with a look every second, it is the one Ray
    Train finds (test time only, like the health checks above; users' clusters keep Ray's)."""
    import ray
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class QuickLook(coordinator._AutoscalingCoordinatorActor):
        TICK_INTERVAL_S = 1

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(QuickLook).options(
        name="AutoscalingCoordinator", namespace="AutoscalingCoordinator", lifetime="detached",
        scheduling_strategy=here).remote()
    assert ray.get(actor.get_reserved_resources.remote("rayssl-tests")) == {}  # up, and the one Ray Train gets
    assert coordinator.get_or_create_autoscaling_coordinator()._actor_id == actor._actor_id
    return actor


def node_config(bucket: str, name: str, mlflow_uri: str, *extra: str):
    return load_config(ROOT / "configs/fashion_mnist.yaml", [
        f"data.source=s3://{bucket}/fm/train", f"data.eval_source=s3://{bucket}/fm/test", "data.decode_on=data",
        "data.train_limit=1024", "data.eval_limit=256", "eval.baselines=false", "tracking.log_model=false",
        "train.time_budget=null", "eval.every_epochs=null", "eval.gallery_clusters=0",
        "model.width=8", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32", "objective.num_clusters=32",
        "train.batch_size=32", "optim.warmup_epochs=0", "scaling.cpus_per_worker=0.5",
        f"run.storage_path=s3://{bucket}/runs", f"run.name={name}", f"tracking.uri={mlflow_uri}",
        f"tracking.experiment={name}", *extra])


def train_workers(state: str = "ALIVE") -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", state)], detail=True)


def test_a_cluster_that_shares_no_disk_refuses_local_storage_and_a_local_mlflow_store(ray_nodes, mlflow_server,
                                                                                    tmp_path) -> None:
    _, bucket = ray_nodes
    uri, _ = mlflow_server
    name = f"local-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConfigError, match=r"^run.storage_path: .* is a local folder, but this Ray cluster has 3 "
                                          r"nodes that share no disk; set it to s3://bucket/prefix$"):
        pretrain(node_config(bucket, name, uri, f"run.storage_path={tmp_path}"))
    with pytest.raises(ConfigError, match=r"^tracking.uri: sqlite:///.* is a local MLflow store"):
        pretrain(node_config(bucket, name, f"sqlite:///{tmp_path}/mlflow.db"))


def metric_history(uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_metric_history(run_id, key)


def run_in_thread(cfg) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome.update(pretrain(cfg))
        except BaseException as err:  # reported by the test's assertions
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"{what}: not within {seconds:.0f} s")
        time.sleep(0.2)


def remove_node_of_a_worker(cluster, node_id: str | None = None) -> float:
    """Remove (raylet and every process) ``node_id`` or the node of the last training worker;
    when."""
    node_id = node_id or train_workers()[-1].node_id
    node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
    killed_at = time.time()
    cluster.remove_node(node, allow_graceful=False)
    return killed_at


def test_a_lost_node_shrinks_the_run_from_its_checkpoint_in_the_same_mlflow_run_and_a_new_node_grows_it(
        ray_nodes, mlflow_server, capfd) -> None:
    """scaling.num_workers=[1,2] SPREAD on the two 1-CPU trainer nodes, 0.5 CPU per worker, the
    head's CPUs taken: every node has at most 0.5 CPU free beside the workers, the layout in
    which 1-CPU Ray Data tasks fit nowhere and the run hung. Ray Data's tasks ask for 0.5 CPU
    (data.cpus_per_task's default, the workers' units), so the run trains on.

    The node of rank 0 (the one logging to MLflow) is removed after the first checkpoint. With
    run.max_failures the group restarts from the newest checkpoint on the node left, at once
    (no wait for a replacement), and goes on in the same MLflow run, not a second one. A new node
    joins and the run grows back to two (10 epochs, 160 steps: the grow came at step 40 here, 4 s
    after the node was added, with about 120 steps of one worker to spare). The global batch and
    schedules stay fixed, so every step is logged once with the same lr. Prints the recovery
    figures (docs/benchmarks.md)."""
    from mlflow.tracking import MlflowClient
    from ray.util import placement_group_table
    from ray.util.placement_group import placement_group, remove_placement_group

    cluster, bucket = ray_nodes
    uri, _ = mlflow_server
    name = f"elastic-{uuid.uuid4().hex[:6]}"
    hog = placement_group([{"CPU": 2, "node:__internal_head__": 0.01}])  # the head's CPUs, held
    assert hog.wait(60)
    cfg = node_config(bucket, name, uri, "scaling.num_workers=[1,2]", "scaling.worker_resources={trainer: 1}",
                      "scaling.placement_strategy=SPREAD", "scaling.resize_check_s=2", "train.epochs=10",
                      "train.log_every=2", "train.checkpoint_every=8", "run.max_failures=2")
    assert cfg.data_cpus == 0.5
    thread, outcome = run_in_thread(cfg)
    run_id = lambda: outcome.get("mlflow_run_id") or _run_id(uri, name)  # noqa: E731
    sizes = lambda: [m.value for m in metric_history(uri, run_id(), "world_size")] if run_id() else []  # noqa: E731
    fs, root = storage.resolve(f"s3://{bucket}/runs/{name}")
    wait_for(lambda: checkpoints(fs, root) or not thread.is_alive(), 240, "a first checkpoint")
    assert set(sizes()) == {2.0}
    # SPREAD reached Ray: the workers' placement group has its strategy, one bundle on each trainer node
    (group,) = [g for g in placement_group_table().values()
                if g["state"] == "CREATED" and any("trainer" in b for b in g["bundles"].values())]
    assert group["strategy"] == "SPREAD" and len(set(group["bundles_to_node_id"].values())) == 2, group
    assert len({a.node_id for a in train_workers()}) == 2
    client = MlflowClient(uri)
    first_run = run_id()
    rank0_node = client.get_run(first_run).data.tags["rayssl.rank0_node"]
    killed_at = remove_node_of_a_worker(cluster, rank0_node)
    wait_for(lambda: 1.0 in sizes() or not thread.is_alive(), 240, "steps on one worker")
    shrunk_at = time.time()
    cluster.add_node(num_cpus=1, resources={"trainer": 1, "trainer9": 1}, object_store_memory=128 * 1024**2)
    thread.join(timeout=400)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    remove_placement_group(hog)

    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert [r.info.run_id for r in runs] == [first_run] == [outcome["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["rayssl.rank0_node"] != rank0_node
    history = metric_history(uri, first_run, "world_size")
    seen = [m.value for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
    assert seen[0] == 2.0 and 1.0 in seen and seen[-1] == 2.0, seen  # shrank, then grew back
    lr = {m.step: m.value for m in metric_history(uri, first_run, "lr")}
    assert sorted(lr) == list(range(2, 10 * 16 + 1, 2))  # every step logged, none twice-counted
    # each restart resumed from a checkpoint (a multiple of checkpoint_every): on one worker after
    # the loss, recomputing at most the steps since it, then on two when the node joined
    said = capfd.readouterr().out
    line = r"\[rayssl\] resumed from step (\d+)/160 on (\d) workers \(was (\d)\)"
    restarts = [tuple(map(int, m)) for m in re.findall(line, said)]
    assert [r[1:] for r in restarts] == [(1, 2), (2, 1)], restarts
    resumed = restarts[0][0]
    assert all(r[0] % cfg.train.checkpoint_every == 0 for r in restarts) and resumed >= cfg.train.checkpoint_every
    done_before = max(m.step for m in history if m.timestamp / 1000 < killed_at)
    assert 0 <= done_before - resumed <= cfg.train.checkpoint_every, (done_before, resumed)
    with capfd.disabled():
        print(f"\n[recovery] elastic: {shrunk_at - killed_at:.1f} s from the node loss to steps on one worker; "
              f"{done_before - resumed} steps recomputed (resumed at {resumed})")


def _run_id(uri: str, experiment: str) -> str | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return runs[0].info.run_id if runs else None
