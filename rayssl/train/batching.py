"""How one optimizer step's global batch is split over the workers a run has right now.

An elastic run (``scaling.num_workers: [min, max]``) may train with any world size w in the
range, and changes it only at a restart from a checkpoint. What stays fixed at every w:

- the global batch G = ``train.batch_size`` x ``optim.accumulate_steps`` x max (exact when w x a
  divides G, below), hence the peak LR (the linear scaling rule sees the same G) and every
  schedule, which are per optimizer step;
- the steps per epoch (the smallest number that every w in the range can feed, so no worker's
  shard runs out) and therefore the run's total steps and its epoch boundaries.

Fewer workers accumulate more micro-batches: each of w workers takes a = ceil(a0 x max / w)
micro-batches of m = ceil(G / (w a)) <= ``train.batch_size`` images, so memory per worker
never grows. A fixed-size run (min = max) is the plain case a = a0, m = ``train.batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayssl.config import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    world: int
    accumulate: int  # micro-batches per optimizer step on each worker
    micro_batch: int  # images per micro-batch on each worker
    global_batch: int  # G, the nominal images per step (the schedules' batch)

    @property
    def images_per_step(self) -> int:
        """What one step really takes: G, or up to w x a - 1 more when w x a does not divide G."""
        return self.world * self.accumulate * self.micro_batch


def batch_plan(cfg: Config, world: int) -> BatchPlan:
    """The split of G over ``world`` workers (see the module docstring)."""
    a0, top = cfg.optim.accumulate_steps, cfg.scaling.max_workers
    g = cfg.train.batch_size * a0 * top
    accumulate = math.ceil(a0 * top / world)
    return BatchPlan(world, accumulate, math.ceil(g / (world * accumulate)), g)


def steps_per_epoch(cfg: Config, num_train: int) -> int:
    """Optimizer steps per epoch, the same at every world size of ``scaling.num_workers``, so
    per-step all-reduces never hang and an elastic run keeps its schedules.

    Each of w workers gets ``num_train // w`` rows per epoch (Ray Data's equal split) and keeps
    only full micro-batches; the epoch has as many steps as the tightest world size can feed.
    """
    s = cfg.scaling
    available = min((num_train // w) // (p.accumulate * p.micro_batch)
                    for w in range(s.min_workers, s.max_workers + 1) for p in [batch_plan(cfg, w)])
    workers = f"{s.max_workers}" if not s.elastic else f"{s.min_workers}-{s.max_workers}"
    if cfg.train.steps_per_epoch is not None:
        if cfg.train.steps_per_epoch > available:
            raise ConfigError(f"train.steps_per_epoch: {cfg.train.steps_per_epoch} exceeds the {available} "
                              f"full steps that {workers} workers get from {num_train} images")
        return cfg.train.steps_per_epoch
    if available < 1:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} x {s.max_workers} workers "
                          f"needs more than the {num_train} training images")
    return available
