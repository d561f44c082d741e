"""``TrainRun``: one worker's pretraining run, free of Ray.

The run is DINO's ``train_one_epoch`` split at the points where infrastructure enters:

    run = TrainRun(cfg, meta, steps_per_epoch, worker)   # models, objective, optimizer, schedules
    run.restore()              # the newest intact checkpoint, if any
    run.baselines()            # k-NN of raw pixels and of the random-init network (labelled data)
    while (metrics := run.train_interval()) is not None:   # steps up to the next logged step
        run.log(metrics)       # progress line, collapse alarm, MLflow, report (+ checkpoint)
    results = run.finish()     # final k-NN, MLflow results and model, the last report

``run()`` does exactly that. Everything the infrastructure provides comes in a ``Worker``
(``rayssl.train.worker``): the training stream, ``report(metrics, state)``, the checkpoint to
restore, the k-NN sets, the model wrapper (DDP) and rank 0's MLflow writer. Ray Train's
adapter (``rayssl.train.loop``) builds it from its context; tests build it from lists of
batches. Every rank runs the same calls in the same order: the collectives (``rayssl.dist``)
sit in the step, the metrics, the state and k-NN.

``TrainRun`` orchestrates; each of its parts has one job:

- ``DataCursor`` (``rayssl.train.cursor``): the pass over the data, its position, the skipped images;
- ``Window`` (``rayssl.train.window``): the training clock and the logged steps' metrics window;
- ``BudgetClock`` (``rayssl.train.clock``): ``train.time_budget``'s plan and the schedules over it;
- ``Saves`` (``rayssl.train.saves``): the checkpoints kept, and the stops of a full disk or a signal;
- ``RunKnn`` (``rayssl.train.knn``): the online, baseline and final k-NN.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from rayssl import dist
from rayssl.checkpoint import UnsafeCheckpoint
from rayssl.config import Config
from rayssl.console import Progress
from rayssl.data.meta import DataMeta
from rayssl.models import initial_encoder, make_teacher
from rayssl.monitor import CollapseAlarm
from rayssl.objective import ClusterObjective
from rayssl.schedules import online_knn_every, total_steps
from rayssl.tracking import checkpoint_record
from rayssl.train.batching import batch_plan
from rayssl.train.budget import BudgetError
from rayssl.train.clock import BudgetClock
from rayssl.train.cursor import DataCursor
from rayssl.train.gallery import GalleryPass
from rayssl.train.knn import RunKnn
from rayssl.train.saves import DISK_FULL, FAILED_STOPS, SIGNALLED, Saves
from rayssl.train.step import NonFiniteError, Stepper, build_optimizer, use_bf16
from rayssl.train.tracked import finish_tracking
from rayssl.train.views import Views
from rayssl.train.watchdog import StallError, stall_limit
from rayssl.train.window import Window
from rayssl.train.worker import Worker


class TrainRun:
    """One worker's run: setup, restore, train an interval, log and checkpoint, finish."""

    def __init__(self, cfg: Config, meta: DataMeta, steps_per_epoch: int, worker: Worker) -> None:
        self.cfg, self.meta, self.worker, self.mlflow = cfg, meta, worker, worker.mlflow
        self.steps_per_epoch, self.rank = steps_per_epoch, worker.rank
        self.say = worker.say if worker.rank == 0 else (lambda line: None)
        self.progress = worker.progress if worker.rank == 0 else (lambda line, progress: None)
        device = worker.device
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        student = initial_encoder(cfg, meta.channels)  # seeded: the same initial weights on every worker
        student = student.to(memory_format=torch.channels_last)  # oneDNN's faster CPU convs (docs/benchmarks.md)
        self.teacher = make_teacher(student).to(device)
        objective = ClusterObjective(cfg.objective).to(device)
        self.student = worker.prepare_model(student)
        self.plan = batch_plan(cfg, worker.world)  # the same global batch at any world size
        # train.epochs: the run's length, or a budgeted run's cap until the budget fixes its total
        self.budget = BudgetClock(cfg, steps_per_epoch, self.plan, total_steps(cfg, steps_per_epoch),
                                  worker.job_started, device)
        self.step = self.start_step = 0
        self.total_steps, self.schedules = self.budget.total, self.budget.schedules()
        self.stepper = Stepper(self.student, self.teacher, objective, build_optimizer(self.student, cfg.optim),
                               self.schedules, cfg, steps_per_epoch, device, use_bf16(cfg.train.precision, device),
                               accumulate=self.plan.accumulate)
        views = Views(cfg, meta, device)
        self.alarm = CollapseAlarm.of(cfg.monitor)
        self.knn = RunKnn(cfg, meta.num_classes, views.crops, worker.knn_sets, worker.world, device,
                          self.stepper.autocast, worker.online_knn_sets) if worker.knn_sets else None
        self.online_every = online_knn_every(cfg, steps_per_epoch) if worker.knn_sets else 0
        self.gallery = (GalleryPass(cfg, views.crops, worker.gallery_images, device, self.stepper.autocast)
                        if worker.gallery_images and not worker.knn_sets and cfg.eval.gallery_clusters else None)
        self.results: dict = {}
        self.history: list[dict] = []  # this launch's reported metrics, returned to the driver
        self.stopped: str | None = None
        self.saves = Saves(cfg.train.checkpoint_every)
        self.window = Window()
        self.cursor = DataCursor(cfg, worker, views, self.plan, steps_per_epoch, waiting=self._waiting)

    # ------------------------------------------------------------------ start
    def restore(self) -> None:
        """Continue from the newest intact checkpoint, if the worker has one; else seed the crops.

        Weights, optimizer, objective state (prior/center: all-reduced sums and counts, valid at
        any world size) and the step always carry over. Each rank's RNG state and data position
        carry over only at the checkpoint's world size: after an elastic resize every rank
        reseeds from (seed, rank, step) and starts the epoch's rows afresh. A checkpoint holding
        pickled objects stops the run before its first step (``unsafe_checkpoint``: the job exits
        with the refusal's line instead of Ray restarting the workers into it again).
        """
        try:
            state = self.worker.restore(self.say)
        except UnsafeCheckpoint as err:  # the run ends FAILED with its line: Ray restarting it would meet it again
            self._stop("unsafe_checkpoint", str(err))
            return
        if state is None:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank)  # different crops on every worker
            return
        self.stepper.load_state_dict(state)
        self.step = self.start_step = self.saves.last = state["step"]
        earlier = {k: v for k, v in state["results"].items() if k != "stop_reason"}  # why the last launch stopped
        self.results = {**earlier, "resumed_from_step": self.start_step}
        self.budget.restore(state)  # a recorded total is never measured again
        self.total_steps, self.schedules = self.budget.total, self.budget.schedules()
        self.stepper.schedules = self.schedules
        if self.budget.plan:
            self.results["budget"] = self.budget.plan.to_dict()
        world = len(state["rng"])
        self.cursor.restore(state, same_world=world == self.worker.world)
        if world == self.worker.world:
            torch.set_rng_state(state["rng"][self.rank])
        else:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.rank + 7919 * self.step)
        resized = f" on {self.worker.world} workers (was {world})" if world != self.worker.world else ""
        self.say(f"[rayssl] resumed from step {self.start_step}/{self.total_steps}{resized}")

    def baselines(self) -> None:
        """k-NN of the raw pixels and of the network at random init (new runs with labelled data).
        Starts this launch's ``eval_seconds`` (the final k-NN adds to it in ``finish``)."""
        self.results["eval_seconds"], started = 0.0, time.time()
        if self.knn is None:
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
        asked the run to stop (or rank 0's disk could not take its checkpoint); its metrics, or
        None when the run has ended (all steps done, or stopped)."""
        while self.step < self.total_steps and self.stopped is None:
            self._one_step()
            if self.stopped is not None:
                break
            if request := self.saves.stop_request(self.worker, self.step):
                self._stop(*request)
            if (request or self.step % self.cfg.train.log_every == 0
                    or self.saves.due(self.step, self.total_steps, self.budget.fixed_at)):
                return self._metrics()
        return None

    def _one_step(self) -> None:
        """One optimizer step over ``plan.accumulate`` micro-batches, then the budget's clock and,
        at an epoch boundary, the cluster-usage statistics (all-reduced: every rank)."""
        self.student.train(), self.teacher.train()
        accumulate = self.plan.accumulate
        for micro in range(accumulate):
            asked = time.time()
            views = self.cursor.next(self.step)
            if (startup := self.window.got_batch(asked)) is not None:  # the clock times training only
                self.results["first_batch_seconds"] = startup
            self.stepper.micro_batch(views, self.step, micro == accumulate - 1)
            self.window.images += len(views[0]) * self.worker.world
        try:
            self.window.losses += self.stepper.finish(self.step)
        except NonFiniteError as err:
            self._stop("nonfinite", f"{err}; {self.saves.kept()}: lower optim.lr, raise objective.teacher_temperature, "
                                    "set train.precision=fp32 or train.skip_nonfinite")
            return
        self.step += 1
        try:
            fixed = self.budget.after_step(self.step, self.window.started, self.results.get("baseline_seconds", 0.0))
        except BudgetError as err:
            fixed = None
            self._stop("budget", str(err))
        if fixed:  # every schedule laid over the new total, the rest of it stretched at a re-fit
            self.total_steps, self.schedules = self.budget.total, self.budget.schedules()
            self.stepper.schedules, self.results["budget"] = self.schedules, self.budget.plan.to_dict()
            self.say(fixed)
        if self.step % self.steps_per_epoch == 0:
            self.cursor.epoch_done()  # data.deterministic: a pass per epoch, replayable from its start
            prior, assigned = self.stepper.usage.collect()
            if self.mlflow:
                self.mlflow.epoch_plots(self.step // self.steps_per_epoch, prior, assigned)

    def _waiting(self, seconds: float) -> None:
        """The stall watchdog (``rayssl.train.watchdog``), called while this worker waits for a
        batch: past the stall limit, ``StallError`` with one line on what Ray cannot place (the
        driver prints it)."""
        steps = self.step - self.start_step
        limit = stall_limit(self.cfg.run.stall_timeout, (time.time() - self.window.started) / steps if steps else None)
        if seconds > limit:
            line = (f"[rayssl] stalled: worker {self.rank} got no batch for {seconds:.0f} s at step {self.step} "
                    f"(limit {limit:.0f} s, run.stall_timeout): {self.worker.pending()}; {self.saves.kept()}")
            raise StallError(line)

    def _metrics(self) -> dict:
        """The logged metrics of the step just taken (collectives: every rank computes them)."""
        step, s = self.step, self.schedules
        online = None
        if self.online_every and step % self.online_every == 0 and step < self.total_steps and not self.stopped:
            started = time.time()
            online = self.knn({"teacher": self.teacher}, online=True)["teacher"]
            self.results["online_knn_seconds"] = self.results.get("online_knn_seconds", 0.0) + time.time() - started
        images_per_second, data_wait = self.window.rates()
        return {"step": step, "epoch": step / self.steps_per_epoch, "loss": self.window.loss(),
                "lr": float(s["lr"][step - 1]), "wd": float(s["wd"][step - 1]),
                "momentum": float(s["momentum"][step - 1]),
                "teacher_temperature": float(s["teacher_temperature"][step - 1]),
                "images_per_second": images_per_second, "data_wait_fraction": data_wait,
                "data/skipped_images": self.cursor.skipped(),
                "nonfinite_steps": self.stepper.nonfinite_steps, "world_size": self.worker.world,
                **self.stepper.diagnostics(), **({"knn/teacher": online} if online is not None else {})}

    # ------------------------------------------------------------------ log
    def log(self, metrics: dict) -> None:
        """Progress line, weight check, collapse alarm, MLflow, and the report (with a state at
        checkpoint steps, and when the alarm or the driver's stop request stops the run)."""
        checkpoint = ((self.saves.due(self.step, self.total_steps, self.budget.fixed_at) and self.stopped != DISK_FULL)
                      or self.stopped == SIGNALLED)
        if self.stopped == SIGNALLED:
            metrics["stopped"] = SIGNALLED
        self.progress(self.window.progress_line(metrics, self.step, self.start_step, self.total_steps), Progress(
            self.step, self.total_steps, metrics["epoch"], metrics["loss"], metrics["norm/mutual_information"],
            metrics["images_per_second"]))
        if checkpoint and not _finite(self.student, self.teacher):  # a finite loss can still leave inf weights
            self._stop("nonfinite", f"non-finite weights after step {self.step}; {self.saves.kept()}: lower optim.lr")
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
        # rank 0's full disk: every rank stops after the next step (Saves.stop_request)
        full = self.saves.report(self.worker.report, metrics, self.state_dict() if checkpoint else None, self.step)
        if full and self.stopped:  # already stopping (the driver's signal): its line must not claim this checkpoint
            self.results["checkpoint_error"] = full
            self.say(f"[rayssl] {full}")
        self.window.reset()

    def state_dict(self) -> dict:
        """What a checkpoint holds (collectives: every rank's RNG state and data position)."""
        return {**self.stepper.state_dict(), "step": self.step, "results": self.results,
                "total_steps": self.total_steps, "budget": self.budget.plan and self.budget.plan.to_dict(),
                "trained_seconds": self.budget.used_seconds + time.time() - self.window.started,
                "config": self.cfg.redacted(mask=None),
                "tracking": checkpoint_record(self.mlflow and self.mlflow.mlflow_run),
                "meta": self.meta.to_dict(), "skipped_images": self.history[-1]["data/skipped_images"],
                "rng": dist.gather_objects(torch.get_rng_state()),
                "data_position": dist.gather_objects(self.cursor.position)}

    # ------------------------------------------------------------------ end
    def finish(self) -> dict:
        """The final k-NN, MLflow's results and model, and the last report; the run's results
        (with this launch's ``history``, the collapse alarm's text if it fired, and this launch's
        ``train_seconds`` (training, ``online_knn_seconds`` of online k-NN included) and
        ``eval_seconds`` (baselines, final k-NN and gallery))."""
        self.cursor.close()
        if self.alarm.raised:
            self.results["collapse"] = self.alarm.raised
        if self.saves.disk_full and not self.stopped:  # the last step's checkpoint: the run itself is done
            self.results["checkpoint_error"] = self.saves.disk_full
            self.say(f"[rayssl] WARNING {self.saves.disk_full}")
            if self.mlflow:
                self.mlflow.tag("rayssl.checkpoint_error", self.saves.disk_full)
        if self.stopped:
            self.results["stopped"] = self.stopped
            if self.stopped != SIGNALLED:  # the driver's line says it, with the checkpoint
                self.say(f"[rayssl] stopped: {self.results['stop_reason']}")
            if self.mlflow:
                self.mlflow.tag("rayssl.stopped", self.results["stop_reason"])
        if self.stopped not in (*FAILED_STOPS, SIGNALLED):  # the driver marks the MLflow run FAILED / KILLED
            self.results["train_seconds"], started = time.time() - self.window.started, time.time()
            figures = {}
            if self.knn is not None:
                self.results["knn/teacher"], figures = self.knn.final(self.teacher, self.rank, self.meta.classes)
                self.say(f"[rayssl] teacher k-NN {self.results['knn/teacher']:.2%}")
            elif self.gallery is not None:  # no k-NN: the gallery's own pass
                figures = self.gallery.figures(self.teacher, self.rank, self.meta.classes)
            if self.mlflow and figures:  # what the clusters hold (eval.gallery_clusters)
                self.mlflow.figures(figures, "plots/clusters")
            if self.knn is not None or self.gallery is not None:
                self.results["eval_seconds"] = self.results.get("eval_seconds", 0.0) + time.time() - started
            if self.mlflow:
                if self.budget.plan:  # the final total, once (a restart logs the same value)
                    self.mlflow.param("train.total_steps", self.total_steps)
                finish_tracking(self.mlflow, self.cfg, self.meta, self.teacher, self.results, self.step)
        elif self.mlflow:  # what MLflow has not taken yet, delivered or kept; the driver marks the run's status
            self.mlflow.end(status=None)
        self.worker.report({"step": self.step, **self.results}, None)
        return {**self.results, "history": self.history}

    def run(self) -> dict:
        """Restore, baselines, every interval logged, finish: the whole run."""
        self.restore()
        if self.stopped is None and self.step < self.total_steps:  # Ray Data reads ahead during the baselines
            self.cursor.open(self.step)
        if self.stopped is None:
            self.baselines()
        self.window.restart()  # train_seconds, the ETA and the first window count training only
        while (metrics := self.train_interval()) is not None:
            self.log(metrics)
        return self.finish()

    def _stop(self, reason: str, detail: str) -> None:
        self.stopped, self.results["stop_reason"] = reason, detail


def _finite(*models: nn.Module) -> bool:
    """Whether every parameter and buffer is finite (one host sync; at checkpoint steps)."""
    checks = [t.isfinite().all() for m in models for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(checks).all())
