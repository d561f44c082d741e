"""Elastic world sizes without Ray: a checkpoint written by 2 gloo workers resumes on 1 and on 3.

What holds at any world size (``rayssl/train/batching.py``): the global batch (fewer workers
accumulate more micro-batches), hence every per-step schedule, the steps per epoch and the
step count; the objective's state (the prior EMA) restored as saved; each rank's crops
reseeded when the world size changed, so no two ranks draw the same crops. That the prior's
all-reduced sums and counts give the same pi however a global batch is split, unequal splits
included, is pinned by ``test_objective_distributed.py``.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayssl.config import ConfigError
from rayssl.train.batching import batch_plan, steps_per_epoch
from rayssl.train.run import TrainRun
from rayssl.train.worker import Worker
from test_train_run import META, config, data  # noqa: F401  (data: the module fixture)

N = 256
STEPS_PER_EPOCH = 2  # 256 rows: 1, 2 or 3 workers each get at least 2 steps of the 96-image global batch
ELASTIC = ["scaling.num_workers=[1,3]", "train.epochs=3", "train.log_every=1", "train.checkpoint_every=2",
           "eval.baselines=false"]


def run_rank(rank: int, world: int, images: np.ndarray, restore: dict | None) -> dict:
    """One rank's run; what it reported, requested and drew."""
    requested, states, said = [], [], []

    def train_batches(seed: int, rows: int):
        requested.append(rows)
        order = np.random.default_rng(seed).permutation(N)[rank::world]
        for i in range(0, len(order) - rows + 1, rows):
            yield {"image": images[order[i:i + rows]]}

    wrap = (lambda m: torch.nn.parallel.DistributedDataParallel(m)) if world > 1 else (lambda m: m)
    worker = Worker(train_batches, rank=rank, world=world, prepare_model=wrap, restore=lambda say: restore,
                    report=lambda metrics, state: states.append(state) if state is not None and rank == 0 else None,
                    say=said.append)
    run = TrainRun(config(*ELASTIC), META, STEPS_PER_EPOCH, worker)
    run.restore()
    crops = torch.rand(4)  # the rank's first random draw after the restore
    while (metrics := run.train_interval()) is not None:
        run.log(metrics)
    out = run.finish()
    return {"history": out["history"], "requested": requested, "states": states, "said": said, "crops": crops,
            "plan": run.plan, "resumed": out.get("resumed_from_step")}


def _spawned(rank: int, world: int, port: int, outdir: str, images, restore) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(run_rank(rank, world, images, restore), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # The outcome is saved: skip the interpreter's teardown, where a rank aborted now and then after
    # destroy_process_group (SIGABRT, "terminate called without an active exception", about 1 run in 8 on
    # a busy CPU; an error above still reaches mp.spawn)
    os._exit(0)


def run_world(world: int, images, restore, outdir) -> list[dict]:
    """Every rank's outcome of a run on ``world`` gloo processes (bounded wait)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_spawned, args=(world, port, str(outdir), images, restore), nprocs=world, join=False)
    deadline = time.monotonic() + 180
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo workers did not finish within 180 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_global_batch_and_steps_are_fixed_over_the_elastic_range() -> None:
    """G = batch x accumulate x max at every world size; steps per epoch fit the tightest one."""
    cfg = config("scaling.num_workers=[1,3]", "optim.accumulate_steps=2")  # batch 32: G = 192
    plans = {w: batch_plan(cfg, w) for w in (1, 2, 3)}
    assert {w: (p.accumulate, p.micro_batch) for w, p in plans.items()} == {1: (6, 32), 2: (3, 32), 3: (2, 32)}
    assert {p.global_batch for p in plans.values()} == {192} == {p.images_per_step for p in plans.values()}
    uneven = batch_plan(config("scaling.num_workers=[1,4]"), 3)  # G = 128 over 3 workers: 2 x 22 each
    assert (uneven.accumulate, uneven.micro_batch, uneven.images_per_step) == (2, 22, 132)
    assert batch_plan(config("scaling.num_workers=2"), 2).micro_batch == 32  # fixed size: the plain case
    # 1,000 images: 5 steps of 192 on 1 worker; 3 workers get 333 rows each, 5 x 64 = 320 fit
    assert steps_per_epoch(cfg, 1000) == 5
    assert steps_per_epoch(config("scaling.num_workers=[1,4]"), 1000) == 7  # 4 workers: 250 // 32
    with pytest.raises(ConfigError, match="^train.steps_per_epoch: 11 exceeds the 10 "):
        steps_per_epoch(config("scaling.num_workers=[1,3]", "train.steps_per_epoch=11"), 1000)


@pytest.fixture(scope="module")
def images(data):
    return data["train"]


@pytest.mark.slow  # three gloo process groups
def test_two_worker_checkpoint_resumes_on_one_and_on_three_workers(images, tmp_path) -> None:
    (tmp_path / "w2").mkdir(), (tmp_path / "w3").mkdir()
    two = run_world(2, images, None, tmp_path / "w2")
    at_2 = next(s for s in two[0]["states"] if s["step"] == 2)
    assert len(at_2["rng"]) == 2
    one = [run_rank(0, 1, images, at_2)]
    three = run_world(3, images, at_2, tmp_path / "w3")

    reference = two[0]["history"][2:]  # steps 3..6 of the run that never changed size
    for world, ranks in ((1, one), (3, three)):
        assert ranks[0]["resumed"] == 2
        assert f"[rayssl] resumed from step 2/6 on {world} workers (was 2)" in ranks[0]["said"]
        history = ranks[0]["history"]
        assert [m["step"] for m in history] == [3, 4, 5, 6] and {m["world_size"] for m in history} == {world}
        for key in ("lr", "wd", "momentum", "teacher_temperature", "epoch"):
            assert [m[key] for m in history] == [m[key] for m in reference], key
        assert all(np.isfinite(m["loss"]) for m in history)
        plan = ranks[0]["plan"]
        assert plan.images_per_step == 96 == two[0]["plan"].images_per_step
        for r in ranks:  # micro-batches of the plan's size, a fresh pass per epoch (3 epochs from step 2: 2 passes)
            assert r["requested"] == [plan.micro_batch] * 2
        final = ranks[0]["states"][-1]
        assert final["step"] == 6 and len(final["rng"]) == world
        assert not torch.equal(final["objective"]["log_prior_ema"], at_2["objective"]["log_prior_ema"])
    assert (one[0]["plan"].accumulate, three[0]["plan"].accumulate, two[0]["plan"].accumulate) == (3, 1, 2)
    crops = [r["crops"] for r in three]
    assert not any(torch.equal(a, b) for i, a in enumerate(crops) for b in crops[i + 1:])  # reseeded per rank


def test_a_cluster_that_cannot_hold_min_workers_is_named_in_one_line() -> None:
    from rayssl.train.launch import placement_warning

    cfg = config("scaling.num_workers=[2,4]", "scaling.cpus_per_worker=1", "scaling.worker_resources={trainer: 1}")
    assert placement_warning(cfg, {"CPU": 8, "trainer": 2}) is None
    line = placement_warning(cfg, {"CPU": 8, "trainer": 1})
    assert line.startswith("[rayssl] WARNING scaling.num_workers: the cluster holds 1 of the 2 workers needed "
                           "(1 CPU, 1 trainer each)") and "\n" not in line
    gpu = config("scaling.num_workers=2", "scaling.use_gpu=true", "scaling.cpus_per_worker=4")
    assert "holds 0 of the 2" in placement_warning(gpu, {"CPU": 16})
    assert placement_warning(gpu, {"CPU": 16, "GPU": 2}) is None
