"""``Worker``: everything the infrastructure gives one worker's ``rayssl.train.run.TrainRun``.

Ray Train's adapter (``rayssl.train.loop``) builds it from its context; tests build it from
lists of batches and fakes. The run reaches data, reports, checkpoints, MLflow and the console
only through it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from rayssl.console import Progress
from rayssl.tracking import RunLogger


def say(line: str) -> None:
    """One line to the console (Ray Train's patched ``print`` would show it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class Worker:
    """What the infrastructure gives one worker's ``TrainRun``.

    - ``train_batches(seed, rows)``: one pass over this worker's training shard (numpy batches
      of ``rows`` rows, shuffled with ``seed``; see ``rayssl.train.views.Views``), one epoch or
      more: Ray Train's stream holds every epoch of the run, so that it runs on across epoch
      boundaries (one epoch with ``data.decode_on=data``: the next pass starts when it runs out);
      with ``data.deterministic`` it holds one, and each epoch boundary ends the pass;
    - ``report(metrics, state)``: called on every rank at each logged step; with a state,
      rank 0 keeps it as a checkpoint, and raises ``DiskFull`` when its disk cannot take it;
    - ``restore(say)``: the newest intact checkpoint's state, or None for a new run;
    - ``knn_sets()``: fresh ``(bank, queries)`` iterables of this worker's labelled batches, or
      None when the data has no labels (no k-NN); the query batches carry ``id`` for the
      end-of-run gallery (``rayssl.train.gallery``);
    - ``online_knn_sets()``: the same, smaller (``eval.online_train_limit`` / ``online_eval_limit``),
      for the online k-NN points; None: they use ``knn_sets``;
    - ``gallery_images()``: without a k-NN (no ``knn_sets``), a fresh iterable of this worker's
      share of the images the end-of-run gallery is drawn from (``rayssl.train.gallery.GalleryPass``),
      with ``id``; None: no gallery;
    - ``prepare_model``: wraps the student for data parallelism (DDP), identity by default;
    - ``say(line)``, ``progress(line, Progress)``: rank 0's console lines and logged steps (the
      driver's ``rayssl.console`` draws a bar from the latter);
    - ``mlflow``: rank 0's MLflow writer (``rayssl.tracking.RunLogger``), None on the other ranks
      and without tracking; its run is named in every checkpoint;
    - ``job_started``: when the job started (``time.time()`` on the driver), the clock of
      ``train.time_budget_scope=job``;
    - ``stop_requested()``: asked after every step; the name of the signal the driver got
      (``rayssl.train.stop``) once the run should stop, else None. Only rank 0's is read;
    - ``pending()``: what the cluster cannot place (``rayssl.train.watchdog.pending_line``), for
      the stall watchdog's line.
    """

    train_batches: Callable[[int, int], Iterable[dict]]
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict, dict | None], None] = lambda metrics, state: None
    restore: Callable[[Callable[[str], None]], dict | None] = lambda say: None
    knn_sets: Callable[[], tuple[Iterable[dict], Iterable[dict]]] | None = None
    online_knn_sets: Callable[[], tuple[Iterable[dict], Iterable[dict]]] | None = None
    gallery_images: Callable[[], Iterable[dict]] | None = None
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model
    say: Callable[[str], None] = say
    progress: Callable[[str, Progress], None] = lambda line, progress: say(line)
    mlflow: RunLogger | None = None
    job_started: float = field(default_factory=time.time)
    stop_requested: Callable[[], str | None] = lambda: None
    pending: Callable[[], str] = lambda: "no cluster to ask"
