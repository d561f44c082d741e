"""``TrainRun``: one worker's pretraining run, free of Ray.

The run is DINO's ``train_one_epoch`` split at the points where infrastructure enters:

    run = TrainRun(cfg, meta, steps_per_epoch, worker)   # models, objective, optimizer, schedules
    run.restore()              # the newest intact checkpoint, if any
    run.baselines()            # k-NN of raw pixels and of the random-init network (labelled data)
    while (metrics := run.train_interval()) is not None:   # steps up to the next logged step
        run.log(metrics)       # progress line, collapse alarm, MLflow, report (+ checkpoint)
    results = run.finish()     # final k-NN, MLflow results and model, the last report

``run()`` does exactly that. Everything the infrastructure provides comes in a ``Worker``:
the training stream, ``report(metrics, state)``, the checkpoint to restore, the k-NN sets and
the model wrapper (DDP). Ray Train's adapter (``rayssl.train.loop``) builds it from its
context; tests build it from lists of batches. Every rank runs the same calls in the same
order: the collectives (``rayssl.dist``) sit in the step, the metrics, the state and k-NN.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rayssl import dist
from rayssl.checkpoint import DiskFull
from rayssl.config import Config
from rayssl.console import Progress
from rayssl.data.meta import DataMeta
from rayssl.eval.online import batch_images, first_images, knn_eval
from rayssl.eval.protocol import precise_bn
from rayssl.models import build_encoder, make_teacher, unwrap
from rayssl.monitor import CollapseAlarm
from rayssl.objective import ClusterObjective, ObjectiveSpec
from rayssl.schedules import build_schedules, online_knn_every, stretch, total_steps
from rayssl.tracking import MlflowRun, RunFolder, RunLogger, checkpoint_record
from rayssl.train.batching import batch_plan
from rayssl.train.budget import (BudgetError, BudgetPlan, budget_total, check_budget, measure_window,
                                 refit_due)
from rayssl.train.prefetch import Ahead
from rayssl.train.step import NonFiniteError, Stepper, build_optimizer, use_bf16
from rayssl.train.views import Views
from rayssl.train.watchdog import StallError, stall_limit


def say(line: str) -> None:
    """One line to the console (Ray Train's patched ``print`` would show it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


_RAN_OUT = object()  # the end of a pass, told apart from a batch with no decodable image (None)
FAILED_STOPS = ("nonfinite", "budget", "disk_full")  # stops that end the run FAILED, without the final k-NN
SIGNALLED = "signal"  # the driver's stop request (rayssl.train.stop): a checkpoint, no final k-NN, KILLED
DISK_FULL = "disk_full"  # a checkpoint its disk could not take (rayssl.checkpoint.DiskFull): no more checkpoints


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
      None when the data has no labels (no k-NN);
    - ``prepare_model``: wraps the student for data parallelism (DDP), identity by default;
    - ``say(line)``, ``progress(line, Progress)``: rank 0's console lines and logged steps (the
      driver's ``rayssl.console`` draws a bar from the latter);
    - ``node``: the id of the node this worker runs on (rank 0's is tagged ``rayssl.rank0_node``
      in MLflow, newest launch wins: where its logs are, and which node a test may remove);
    - ``job_started``: when the job started (``time.time()`` on the driver), the clock of
      ``train.time_budget_scope=job``;
    - ``run_folder``: where the checkpoints go; rank 0 keeps its MLflow backlog there when
      MLflow does not answer at the end (``rayssl.tracking_backlog``);
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
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model
    say: Callable[[str], None] = say
    progress: Callable[[str, Progress], None] = lambda line, progress: say(line)
    node: str = ""
    job_started: float = field(default_factory=time.time)
    run_folder: RunFolder | None = None
    stop_requested: Callable[[], str | None] = lambda: None
    pending: Callable[[], str] = lambda: "no cluster to ask"


class TrainRun:
    """One worker's run: setup, restore, train an interval, log and checkpoint, finish."""

    def __init__(self, cfg: Config, meta: DataMeta, steps_per_epoch: int, worker: Worker,
                 tracking: MlflowRun | None = None) -> None:
        self.cfg, self.meta, self.worker, self.tracking = cfg, meta, worker, tracking
        self.steps_per_epoch, self.rank = steps_per_epoch, worker.rank
        self.say = worker.say if worker.rank == 0 else (lambda line: None)
        self.progress = worker.progress if worker.rank == 0 else (lambda line, progress: None)
        device = worker.device
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed)  # same initial weights on every worker
        student = build_encoder(cfg.model, meta.channels, cfg.augment.global_crop_size, cfg.objective.num_clusters)
        student = student.to(memory_format=torch.channels_last)  # 1.7x faster convs on CPU (oneDNN)
        self.teacher = make_teacher(student).to(device)
        objective = ClusterObjective(ObjectiveSpec.from_mapping(cfg.objective.model_dump())).to(device)
        self.student = worker.prepare_model(student)
        self.plan = batch_plan(cfg, worker.world)  # the same global batch at any world size
        # train.epochs: the run's length, or a budgeted run's cap until its total is fixed (``_time_step``)
        self.step = self.start_step = self.last_checkpoint = 0
        self.cap_steps = self.total_steps = total_steps(cfg, steps_per_epoch)
        self.schedules = self._schedules(self.cap_steps, self._timed()[1] if cfg.train.time_budget else 0)
        self.stepper = Stepper(self.student, self.teacher, objective, build_optimizer(self.student, cfg.optim),
                               self.schedules, cfg, steps_per_epoch, device, use_bf16(cfg.train.precision, device),
                               accumulate=self.plan.accumulate)
        self.budget: BudgetPlan | None = None  # what train.time_budget bought, once fixed
        self.fixed_at = 0  # the step at which this launch last fixed the budget's total (0: it did not)
        self.fit_clock = 0.0  # when it did (0: this launch re-times nothing: it did not time the steps)
        self.used_seconds = 0.0  # training seconds of earlier launches (the budget's clock)
        self.views = Views(cfg, meta, device)
        self.alarm = CollapseAlarm.of(cfg.monitor)
        self.mlflow = RunLogger(tracking, worker.say, run_folder=worker.run_folder,
                                model_config=cfg.model.model_dump()) if tracking and worker.rank == 0 else None
        if self.mlflow and worker.node:
            self.mlflow.tag("rayssl.rank0_node", worker.node)
        self.online_every = online_knn_every(cfg, steps_per_epoch) if worker.knn_sets else 0
        self.results: dict = {}
        self.history: list[dict] = []  # this launch's reported metrics, returned to the driver
        self.stopped: str | None = None
        self.disk_full: str | None = None  # rank 0: the checkpoint its disk could not take, until all ranks stop
        self.position = 0  # batches of the current pass consumed (data.deterministic: of the epoch, for resumes)
        self.skipped_before = 0
        self.fed = False  # whether this launch has had its first training batch
        self._batches: Ahead | None = None  # the pass's views, prepared ahead (not with data.deterministic)
        self.prefetch = 0 if cfg.data.deterministic else cfg.data.prefetch_batches
        self._start_clock()

    # ------------------------------------------------------------------ start
    def restore(self) -> None:
        """Continue from the newest intact checkpoint, if the worker has one; else seed the crops.

        Weights, optimizer, objective state (prior/centre: all-reduced sums and counts, valid at
        any world size) and the step always carry over. Each rank's RNG state and data position
        carry over only at the checkpoint's world size: after an elastic resize every rank
        reseeds from (seed, rank, step) and starts the epoch's rows afresh.
        """
        state = self.worker.restore(self.say)
        if state is None:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank)  # different crops on every worker
            return
        self.stepper.load_state_dict(state)
        self.step = self.start_step = self.last_checkpoint = state["step"]
        self.used_seconds = state.get("trained_seconds", 0.0)
        earlier = {k: v for k, v in state["results"].items() if k != "stop_reason"}  # why the last launch stopped
        self.results = {**earlier, "resumed_from_step": self.start_step}
        if state.get("budget"):  # the recorded total, never measured again
            self._fix(BudgetPlan(**state["budget"]))
        elif self.cfg.train.time_budget:  # not fixed yet: this launch times its own steps
            self.schedules = self.stepper.schedules = self._schedules(self.cap_steps, self._timed()[1])
        self.skipped_before = state.get("skipped_images", 0)
        world = len(state["rng"])
        if world == self.worker.world:
            torch.set_rng_state(state["rng"][self.rank])
            if self.cfg.data.deterministic and "data_position" in state:
                self.position = state["data_position"][self.rank]
        else:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank + 7919 * self.step)
        resized = f" on {self.worker.world} workers (was {world})" if world != self.worker.world else ""
        self.say(f"[rayssl] resumed from step {self.start_step}/{self.total_steps}{resized}")

    def baselines(self) -> None:
        """k-NN of the raw pixels and of the network at random init (new runs with labelled data).
        Starts this launch's ``eval_seconds`` (the final k-NN adds to it in ``finish``)."""
        self.results["eval_seconds"], started = 0.0, time.time()
        if not self.worker.knn_sets:
            self.say("[rayssl] k-NN evaluation skipped: it needs labelled data.source and data.eval_source shards")
            return
        if self.start_step > 0 or not self.cfg.eval.baselines:
            return
        found = self.knn({"raw_pixels": None, "random_init": self.teacher})
        seconds = time.time() - started  # also the final k-NN's expected time (the same network and sets)
        self.results.update({f"knn/{k}": v for k, v in found.items()}, eval_seconds=seconds, baseline_seconds=seconds)
        self.say(f"[rayssl] k-NN baselines: raw pixels {found['raw_pixels']:.2%}, "
                 f"random init {found['random_init']:.2%}")

    # ------------------------------------------------------------------ train
    def train_interval(self) -> dict | None:
        """Train up to the next logged or checkpointed step, or the step after which the driver
        asked the run to stop; its metrics, or None when the run has ended (all steps done, or
        stopped)."""
        while self.step < self.total_steps and self.stopped is None:
            self._one_step()
            if self.stopped is None and (self._stop_requested() or self._log_step() or self._checkpoint_step()):
                return self._metrics()
        return None

    def _stop_requested(self) -> bool:
        """Whether rank 0 stops the run: the driver asked it to (``Worker.stop_requested``), or its
        last checkpoint did not fit on its disk. One collective per step, so that every rank stops
        after the same step, for the same reason."""
        why = self.worker.stop_requested() if self.rank == 0 and not self.disk_full else None
        code = dist.largest(2 if self.disk_full else int(why is not None), self.worker.device)
        if code == 2:
            self._stop(DISK_FULL, self.disk_full or "rank 0's checkpoint did not fit on its disk")
        elif code == 1:
            self._stop(SIGNALLED, f"{why or 'a signal'} at step {self.step}")  # the driver says the rest
        return code > 0

    def _one_step(self) -> None:
        self.student.train(), self.teacher.train()
        accumulate = self.plan.accumulate
        for micro in range(accumulate):
            views = self._next_views()
            self.stepper.micro_batch(views, self.step, micro == accumulate - 1)
            self.window_images += len(views[0]) * self.worker.world
        try:
            self.losses += self.stepper.finish(self.step)
        except NonFiniteError as err:
            self._stop("nonfinite", f"{err}; {self._kept()}: lower optim.lr, raise objective.teacher_temperature, "
                                    "set train.precision=fp32 or train.skip_nonfinite")
            return
        self.step += 1
        if self.cfg.train.time_budget and self.budget is None:
            self._time_step()
        elif self.fit_clock and refit_due(self.step, self.budget.timed_until, self.total_steps,
                                          len(self.budget.refits), self.fixed_at):
            self._refit()
        if self.step % self.steps_per_epoch == 0:  # every rank: the usage statistics are all-reduced
            if self.cfg.data.deterministic:  # a pass per epoch, replayable from its start
                self._end_pass()
            prior, assigned = self.stepper.usage.collect()
            if self.mlflow:
                self.mlflow.epoch_plots(self.step // self.steps_per_epoch, prior, assigned)

    def _time_step(self) -> None:
        """``train.time_budget``: time the steps of ``measure_window``, then fix the run's total
        (``rayssl.train.budget``); every rank takes the slowest rank's rate, so all fix the same."""
        first, last = self._timed()
        if self.step == first:
            self.timed_from = time.time()
        if self.step != last:
            return
        t, now = self.cfg.train, time.time()
        seconds, spent, outside, reserve = self._clock(now, (now - self.timed_from) / (last - first))
        try:
            check_budget(t.time_budget, t.budget_seconds, seconds, *self._warmup(), outside_s=outside + reserve)
        except BudgetError as err:
            self._stop("budget", str(err))
            return
        total = budget_total(t.budget_seconds, spent, self.step, seconds, self.cap_steps, reserve)
        self._fix(BudgetPlan(t.time_budget, total, self.steps_per_epoch, self.plan.images_per_step / seconds,
                             timed_until=self.step, capped=total == self.cap_steps, scope=t.time_budget_scope,
                             outside_seconds=outside, reserve_seconds=reserve))
        self.fixed_at, self.fit_clock = self.step, now
        self.say(f"[rayssl] {self.budget.line()}")

    def _refit(self) -> None:
        """A re-timing (``rayssl.train.budget.refit_due``): the total fixed again at the rate of
        the steps since the last fit, the rest of every schedule laid over it."""
        now, steps = time.time(), self.step - self.fixed_at
        seconds, spent, _, reserve = self._clock(now, (now - self.fit_clock) / steps)
        t = self.cfg.train
        total = budget_total(t.budget_seconds, spent, self.step, seconds, self.cap_steps, reserve)
        self._fix(self.budget.refit(self.step, total, self.plan.images_per_step / seconds, total == self.cap_steps))
        self.fixed_at, self.fit_clock = self.step, now
        self.say(f"[rayssl] re-timed at step {self.step:,}: {total:,} steps in all "
                 f"({self.budget.epochs:.1f} epochs) at {self.budget.images_per_second:,.0f} img/s")

    def _clock(self, now: float, seconds_per_step: float) -> list[float]:
        """``[seconds_per_step, spent, outside, reserve]`` of ``rayssl.train.budget``, each the
        largest over the ranks, so that all fix the same total."""
        job = self.cfg.train.time_budget_scope == "job"
        return dist.all_max(torch.tensor([
            seconds_per_step,
            now - self.worker.job_started if job else self.used_seconds + now - self.started,
            self.started - self.worker.job_started if job else 0.0,
            self.results.get("baseline_seconds", 0.0) if job else 0.0], dtype=torch.float64)).tolist()

    def _timed(self) -> tuple[int, int]:
        """The steps this launch times for ``train.time_budget`` (``measure_window``)."""
        return measure_window(self.start_step, self._warmup()[0])

    def _schedules(self, total: int, hold_until: int) -> dict[str, np.ndarray]:
        return build_schedules(self.cfg, self.steps_per_epoch, self.plan.global_batch, total, hold_until)

    def _warmup(self) -> tuple[int, str]:
        """The longest warm-up of the run in steps, and its config key."""
        o, obj = self.cfg.optim, self.cfg.objective
        return max((round(o.warmup_epochs * self.steps_per_epoch), "optim.warmup_epochs"),
                   (round(obj.teacher_temperature_warmup_epochs * self.steps_per_epoch),
                    "objective.teacher_temperature_warmup_epochs"))

    def _fix(self, budget: BudgetPlan) -> None:
        """The run's total steps from its budget: every schedule built over the first total, then
        stretched at each re-fit."""
        self.budget, self.total_steps = budget, budget.total_steps
        schedules = self._schedules(budget.first_total, budget.timed_until)
        for at, total in budget.refits:
            schedules = stretch(schedules, at, total)
        self.schedules = self.stepper.schedules = schedules
        self.results["budget"] = budget.to_dict()

    def _next_views(self) -> list[torch.Tensor]:
        """The next batch with a decodable image (a batch with none is skipped whole)."""
        started = time.time()
        while True:
            if self._batches is None:
                self._open_pass()
            views = next(self._batches, _RAN_OUT)
            if views is _RAN_OUT:  # a pass must feed at least one epoch; then the next one starts
                if self.position < self.steps_per_epoch * self.plan.accumulate:
                    raise RuntimeError(f"worker {self.rank}: data shard ran out at step {self.step}; "
                                       "set train.steps_per_epoch lower")
                self._end_pass()
                continue
            self.position += 1
            if views is not None:
                if not self.fed:  # the wait for this launch's first batch is start-up: the clock times training
                    self.fed, self.results["first_batch_seconds"] = True, time.time() - self.window_start
                    self._start_clock()
                else:
                    self.wait += time.time() - started
                return views

    def _open_pass(self) -> None:
        """Start a pass over this worker's shard; after a resume, skip what the epoch used. Its
        views are prepared ``data.prefetch_batches`` ahead from now on."""
        batches = iter(self.worker.train_batches(self._shuffle_seed(), self.plan.micro_batch))
        for _ in range(self.position):
            next(batches, None)
        self._batches = Ahead(batches, self.views, self.prefetch, waiting=self._waiting)

    def _waiting(self, seconds: float) -> None:
        """The stall watchdog (``rayssl.train.watchdog``), called while this worker waits for a
        batch: past the stall limit, ``StallError`` with one line on what Ray cannot place (the
        driver prints it)."""
        steps = self.step - self.start_step
        limit = stall_limit(self.cfg.run.stall_timeout, (time.time() - self.started) / steps if steps else None)
        if seconds > limit:
            line = (f"[rayssl] stalled: worker {self.rank} got no batch for {seconds:.0f} s at step {self.step} "
                    f"(limit {limit:.0f} s, run.stall_timeout): {self.worker.pending()}; {self._kept()}")
            raise StallError(line)

    def _end_pass(self) -> None:
        self._batches.close()
        self.position, self._batches = 0, None

    def _shuffle_seed(self) -> int:
        """The local shuffle seed of the pass that starts now: per epoch with
        ``data.deterministic`` (a resume replays its epoch), otherwise per pass."""
        seed = self.cfg.train.seed + self.rank
        if self.cfg.data.deterministic:
            return seed + 7919 * (self.step // self.steps_per_epoch)
        return seed + self.step

    def _log_step(self) -> bool:
        return self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps

    def _checkpoint_step(self) -> bool:
        """Every ``train.checkpoint_every`` steps, at the end, and where the budget's total was fixed
        (so a restart finds it)."""
        return (self.step % self.cfg.train.checkpoint_every == 0 or self.step == self.total_steps
                or self.step == self.fixed_at)

    def _metrics(self) -> dict:
        """The logged metrics of the step just taken (collectives: every rank computes them)."""
        step, s = self.step, self.schedules
        online = None
        if self.online_every and step % self.online_every == 0 and step < self.total_steps and not self.stopped:
            online = self.knn({"teacher": self.teacher})["teacher"]
        elapsed = time.time() - self.window_start
        return {"step": step, "epoch": step / self.steps_per_epoch,
                "loss": float(torch.stack(self.losses).mean()) if self.losses else float("nan"),  # nan: all skipped
                "lr": float(s["lr"][step - 1]), "wd": float(s["wd"][step - 1]),
                "momentum": float(s["momentum"][step - 1]),
                "teacher_temperature": float(s["teacher_temperature"][step - 1]),
                "images_per_second": self.window_images / elapsed, "data_wait_fraction": self.wait / elapsed,
                "data/skipped_images": dist.sum_int(self.views.skipped) + self.skipped_before,
                "nonfinite_steps": self.stepper.nonfinite_steps, "world_size": self.worker.world,
                **self.stepper.diagnostics(), **({"knn/teacher": online} if online is not None else {})}

    # ------------------------------------------------------------------ log
    def log(self, metrics: dict) -> None:
        """Progress line, weight check, collapse alarm, MLflow, and the report (with a state at
        checkpoint steps, and when the alarm or the driver's stop request stops the run)."""
        checkpoint = (self._checkpoint_step() and self.stopped != DISK_FULL) or self.stopped == SIGNALLED
        if self.stopped == SIGNALLED:
            metrics["stopped"] = SIGNALLED
        self.progress(self._progress(metrics), Progress(
            self.step, self.total_steps, metrics["epoch"], metrics["loss"], metrics["norm/mutual_information"],
            metrics["images_per_second"]))
        if checkpoint and not _finite(self.student, self.teacher):  # a finite loss can still leave inf weights
            self._stop("nonfinite", f"non-finite weights after step {self.step}; {self._kept()}: lower optim.lr")
            return
        collapse = self.alarm.observe(self.step, metrics)
        if collapse:
            self.say(f"[rayssl] WARNING {collapse}")
            if self.mlflow:
                self.mlflow.tag("rayssl.collapse", collapse)
            if self.cfg.monitor.stop_on_collapse:
                self._stop("collapse", collapse)
                metrics["stopped"], checkpoint = "collapse", True
        self.history.append(metrics)
        if self.mlflow:
            self.mlflow.metrics(self.step, metrics)
        try:
            self.worker.report(metrics, self.state_dict() if checkpoint else None)
        except DiskFull as err:  # rank 0 only: every rank stops after the next step (_stop_requested)
            kept = f"the checkpoint of step {self.last_checkpoint} is intact" if self.last_checkpoint else \
                "no checkpoint was saved"
            self.disk_full = f"{err}; {kept}: free space on that disk"
            if self.stopped:  # already stopping (the driver's signal): its line must not claim this checkpoint
                self.results["checkpoint_error"] = self.disk_full
                self.say(f"[rayssl] {self.disk_full}")
            checkpoint = False
        self.last_checkpoint = self.step if checkpoint else self.last_checkpoint
        self._window()

    def state_dict(self) -> dict:
        """What a checkpoint holds (collectives: every rank's RNG state and data position)."""
        return {**self.stepper.state_dict(), "step": self.step, "results": self.results,
                "total_steps": self.total_steps, "budget": self.budget and self.budget.to_dict(),
                "trained_seconds": self.used_seconds + time.time() - self.started,
                "config": self.cfg.redacted(mask=None), "tracking": checkpoint_record(self.tracking),
                "meta": self.meta.to_dict(), "skipped_images": self.history[-1]["data/skipped_images"],
                "rng": dist.gather_objects(torch.get_rng_state()),
                "data_position": dist.gather_objects(self.position)}

    def _progress(self, metrics: dict) -> str:
        done = self.step - self.start_step
        eta = (time.time() - self.started) / max(done, 1) * (self.total_steps - self.step)
        return (f"[rayssl] step {self.step}/{self.total_steps} ({100 * self.step / self.total_steps:.0f}%) "
                f"epoch {metrics['epoch']:.2f} loss {metrics['loss']:.3f} "
                f"I(X;K) {metrics['norm/mutual_information']:.2f} "
                f"eff.clusters {metrics['norm/effective_clusters']:.0f} "
                f"{metrics['images_per_second']:.0f} img/s ETA {eta / 60:.1f} min")

    # ------------------------------------------------------------------ end
    def finish(self) -> dict:
        """The final k-NN, MLflow's results and model, and the last report; the run's results
        (with this launch's ``history``, the collapse alarm's text if it fired, and this launch's
        ``train_seconds`` (training, online k-NN included) and ``eval_seconds`` (baselines and
        final k-NN))."""
        if self._batches is not None:
            self._batches.close()
        if self.alarm.raised:
            self.results["collapse"] = self.alarm.raised
        if self.disk_full and not self.stopped:  # the last step's checkpoint: the run itself is done
            self.results["checkpoint_error"] = self.disk_full
            self.say(f"[rayssl] WARNING {self.disk_full}")
            if self.mlflow:
                self.mlflow.tag("rayssl.checkpoint_error", self.disk_full)
        if self.stopped:
            self.results["stopped"] = self.stopped
            if self.stopped != SIGNALLED:  # the driver's line says it, with the checkpoint
                self.say(f"[rayssl] stopped: {self.results['stop_reason']}")
            if self.mlflow:
                self.mlflow.tag("rayssl.stopped", self.results["stop_reason"])
        if self.stopped not in (*FAILED_STOPS, SIGNALLED):  # the driver marks the MLflow run FAILED / KILLED
            self.results["train_seconds"], started = time.time() - self.started, time.time()
            if self.worker.knn_sets:
                self.results["knn/teacher"] = self.knn({"teacher": self.teacher})["teacher"]
                self.say(f"[rayssl] teacher k-NN {self.results['knn/teacher']:.2%}")
                self.results["eval_seconds"] = self.results.get("eval_seconds", 0.0) + time.time() - started
            if self.mlflow:
                if self.budget:  # the final total, once (a restart logs the same value)
                    self.mlflow.param("train.total_steps", self.total_steps)
                self._finish_tracking()
        elif self.mlflow:  # what MLflow has not taken yet, delivered or kept; the driver marks the run's status
            self.mlflow.end(status=None)
        self.worker.report({"step": self.step, **self.results}, None)
        return {**self.results, "history": self.history}

    def run(self) -> dict:
        """Restore, baselines, every interval logged, finish: the whole run."""
        self.restore()
        if self.step < self.total_steps:  # Ray Data reads ahead while the baselines run, not in the first steps
            self._open_pass()
        self.baselines()
        self._start_clock()  # train_seconds, the ETA and the first window count training only
        while (metrics := self.train_interval()) is not None:
            self.log(metrics)
        return self.finish()

    def _finish_tracking(self) -> None:
        """Rank 0, after the last step: results, training curves, the teacher's backbone."""
        run, cfg = self.mlflow, self.cfg
        run.results(self.results, self.step)
        run.curves(f"{cfg.objective.mode}, K={cfg.objective.num_clusters}, {cfg.model.backbone}")
        if run.settings.log_model:
            # contiguous weights: torch.export warns on channels_last ones ("No complete tensor found")
            backbone = copy.deepcopy(unwrap(self.teacher).backbone).float().cpu().eval().to(
                memory_format=torch.contiguous_format)
            size, meta = cfg.augment.global_crop_size, self.meta
            example = np.random.default_rng(0).standard_normal((2, meta.channels, size, size)).astype(np.float32)
            run.model(backbone, example, {"input": "normalised images (N, C, H, W); see preprocessing",
                                          "image_size": size, "channels": meta.channels,
                                          "mean": list(meta.mean), "std": list(meta.std)})
        run.end()

    # ------------------------------------------------------------------ helpers
    def knn(self, rows: dict[str, nn.Module | None]) -> dict[str, float]:
        """Weighted k-NN of each named row: a network's backbone features, or the raw pixels (None),
        under the feature protocol (``rayssl.eval.protocol``): each network with its BatchNorm
        statistics recomputed on this worker's share of the first ``eval.precise_bn_images`` clean
        bank images, every row centred by the bank mean (``eval.centre``)."""
        e, device = self.cfg.eval, self.worker.device
        crops, size = self.views.crops, self.cfg.augment.global_crop_size
        bank, queries = self.worker.knn_sets()
        clean, bank = first_images(bank, -(-e.precise_bn_images // self.worker.world))

        def features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
            with self.stepper.autocast:
                return backbone(crops.eval_transform(x, size).contiguous(memory_format=torch.channels_last))

        nets = {name: unwrap(m).backbone for name, m in rows.items() if m is not None}
        if e.precise_bn_images:
            nets = {name: precise_bn(m, (batch_images(b, device) for b in clean), features)
                    for name, m in nets.items()}

        @torch.no_grad()
        def fn(x: torch.Tensor) -> list[torch.Tensor]:
            for m in nets.values():
                m.eval()
            return [x.flatten(1).float() / 255 if m is None else features(nets[name], x) for name, m in rows.items()]
        return knn_eval(bank, queries, fn, list(rows), k=e.knn_k, temperature=e.knn_temperature,
                        num_classes=self.meta.num_classes, device=device, centre=e.centre)

    def _stop(self, reason: str, detail: str) -> None:
        self.stopped, self.results["stop_reason"] = reason, detail

    def _kept(self) -> str:
        if self.last_checkpoint == 0:
            return "no checkpoint was saved"
        return f"nothing saved after the checkpoint of step {self.last_checkpoint}"

    def _start_clock(self) -> None:
        self.started = time.time()
        self._window()

    def _window(self) -> None:
        """Start a new metrics window (losses, throughput, data wait)."""
        self.losses: list[torch.Tensor] = []
        self.window_start, self.window_images, self.wait = time.time(), 0, 0.0


def _finite(*models: nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one host sync; at checkpoint steps)."""
    checks = [t.isfinite().all() for m in models for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(checks).all())
