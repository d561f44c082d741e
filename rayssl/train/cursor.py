"""``DataCursor``: where one worker is in its training data.

A pass is one ``Worker.train_batches`` stream, shuffled with a seed of its first step, turned
into views ``data.prefetch_batches`` ahead (``rayssl.train.prefetch.Ahead``). A pass must feed
at least one epoch; when it runs out the next one starts. With ``data.deterministic`` a pass
is one epoch, seeded by the epoch, and its position goes into every checkpoint so that a
resume replays the epoch's rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rayssl import dist
from rayssl.config import Config
from rayssl.train.batching import BatchPlan
from rayssl.train.prefetch import Ahead
from rayssl.train.views import Views
from rayssl.train.worker import Worker

_RAN_OUT = object()  # the end of a pass, told apart from a batch with no decodable image (None)


class DataCursor:
    """The pass a worker reads, the batches of it consumed, and the images skipped so far."""

    def __init__(self, cfg: Config, worker: Worker, views: Views, plan: BatchPlan, steps_per_epoch: int,
                 waiting: Callable[[float], None]) -> None:
        self.worker, self.views, self.plan, self.steps_per_epoch = worker, views, plan, steps_per_epoch
        self.seed, self.deterministic = cfg.train.seed + worker.rank, cfg.data.deterministic
        self.prefetch = 0 if cfg.data.deterministic else cfg.data.prefetch_batches
        self.waiting = waiting  # the stall watchdog, called while a prepared pass is waited for
        self.position = 0  # batches of the current pass consumed (data.deterministic: of the epoch, for resumes)
        self.skipped_before = 0  # undecodable images of earlier launches
        self.batches: Ahead | None = None  # the pass's views, prepared ahead (not with data.deterministic)

    def restore(self, state: dict, same_world: bool) -> None:
        """The skipped count of a checkpoint, and its position in the epoch when it was taken at
        this world size with ``data.deterministic`` (else the epoch's rows start afresh)."""
        self.skipped_before = state.get("skipped_images", 0)
        if same_world and self.deterministic and "data_position" in state:
            self.position = state["data_position"][self.worker.rank]

    def open(self, step: int) -> None:
        """Start a pass at ``step``; after a resume, skip what the epoch used. Its views are
        prepared ``data.prefetch_batches`` ahead from now on."""
        batches = iter(self.worker.train_batches(self._shuffle_seed(step), self.plan.micro_batch))
        for _ in range(self.position):
            next(batches, None)
        self.batches = Ahead(batches, self.views, self.prefetch, waiting=self.waiting)

    def next(self, step: int) -> list[torch.Tensor]:
        """The views of the next batch with a decodable image (a batch with none is skipped whole)."""
        while True:
            if self.batches is None:
                self.open(step)
            views = next(self.batches, _RAN_OUT)
            if views is _RAN_OUT:  # a pass must feed at least one epoch; then the next one starts
                if self.position < self.steps_per_epoch * self.plan.accumulate:
                    raise RuntimeError(f"worker {self.worker.rank}: data shard ran out at step {step}; "
                                       "set train.steps_per_epoch lower")
                self._end_pass()
                continue
            self.position += 1
            if views is not None:
                return views

    def epoch_done(self) -> None:
        """At an epoch boundary: with ``data.deterministic`` the pass ends there."""
        if self.deterministic:
            self._end_pass()

    def skipped(self) -> int:
        """Undecodable images of the run so far, over every rank (a collective)."""
        return dist.sum_int(self.views.skipped) + self.skipped_before

    def close(self) -> None:
        """Stop preparing views (the run is over)."""
        if self.batches is not None:
            self.batches.close()

    def _end_pass(self) -> None:
        self.batches.close()
        self.position, self.batches = 0, None

    def _shuffle_seed(self, step: int) -> int:
        """The local shuffle seed of a pass that starts at ``step``: per epoch with
        ``data.deterministic`` (a resume replays its epoch), otherwise per pass."""
        if self.deterministic:
            return self.seed + 7919 * (step // self.steps_per_epoch)
        return self.seed + step
