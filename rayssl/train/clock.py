"""``BudgetClock``: ``train.time_budget`` inside one worker's run (the arithmetic is
``rayssl.train.budget``'s).

The clock times the steps of ``measure_window``, fixes the run's total, re-times it at the
re-fit points, and lays every schedule over the plan. Every rank takes the largest of each
measure over the ranks (``rayssl.dist.all_max``), so all fix the same total at the same step.
A restored plan is never measured again.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from rayssl import dist
from rayssl.config import Config
from rayssl.schedules import build_schedules, stretch
from rayssl.train.batching import BatchPlan
from rayssl.train.budget import BudgetPlan, budget_total, check_budget, measure_window, refit_due


class BudgetClock:
    """The budget's plan once fixed, the steps it times, and the schedules it lays."""

    def __init__(self, cfg: Config, steps_per_epoch: int, batch: BatchPlan, cap_steps: int,
                 job_started: float, device: torch.device) -> None:
        self.cfg, self.steps_per_epoch, self.batch, self.cap_steps = cfg, steps_per_epoch, batch, cap_steps
        self.job_started, self.device = job_started, device
        self.start_step = 0  # this launch's first step
        self.plan: BudgetPlan | None = None  # what train.time_budget bought, once fixed
        self.fixed_at = 0  # the step at which this launch last fixed the total (0: it did not)
        self.fit_clock = 0.0  # when it did (0: this launch re-times nothing: it did not time the steps)
        self.timed_from = 0.0  # when the timed steps began
        self.used_seconds = 0.0  # training seconds of earlier launches

    def restore(self, state: dict) -> None:
        """A checkpoint's step, training seconds and recorded plan (kept, never measured again)."""
        self.start_step, self.used_seconds = state["step"], state.get("trained_seconds", 0.0)
        if state.get("budget"):
            self.plan = BudgetPlan(**state["budget"])

    @property
    def total(self) -> int:
        """The run's total steps: the plan's, else the ``train.epochs`` cap."""
        return self.plan.total_steps if self.plan else self.cap_steps

    def schedules(self) -> dict[str, np.ndarray]:
        """Every schedule: built over the plan's first total, then stretched at each re-fit; before
        a plan, over the cap, held from the end of the timed steps of a budgeted run."""
        if self.plan is None:
            return self._build(self.cap_steps, self._timed()[1] if self.cfg.train.time_budget else 0)
        schedules = self._build(self.plan.first_total, self.plan.timed_until)
        for at, total in self.plan.refits:
            schedules = stretch(schedules, at, total)
        return schedules

    def after_step(self, step: int, started: float, reserve: float) -> str | None:
        """Called after every step: the line to say when ``step`` fixed or re-timed the total (the
        new ``plan``), else None; ``BudgetError`` when the budget is too short for the warm-up.
        ``started``: this launch's training clock; ``reserve``: the baselines' k-NN seconds."""
        if self.cfg.train.time_budget and self.plan is None:
            return self._time(step, started, reserve)
        if self.fit_clock and refit_due(step, self.plan.timed_until, self.plan.total_steps,
                                        len(self.plan.refits), self.fixed_at):
            return self._refit(step, started, reserve)
        return None

    def _time(self, step: int, started: float, reserve_s: float) -> str | None:
        """Time the steps of ``measure_window``, then fix the run's total."""
        first, last = self._timed()
        if step == first:
            self.timed_from = time.time()
        if step != last:
            return None
        t, now = self.cfg.train, time.time()
        rate = (now - self.timed_from) / (last - first)
        seconds, spent, outside, reserve = self._clock(now, rate, started, reserve_s)
        check_budget(t.time_budget, t.budget_seconds, seconds, *self._warmup(), outside_s=outside + reserve)
        total = budget_total(t.budget_seconds, spent, step, seconds, self.cap_steps, reserve)
        self.plan = BudgetPlan(t.time_budget, total, self.steps_per_epoch, self.batch.images_per_step / seconds,
                               timed_until=step, capped=total == self.cap_steps, scope=t.time_budget_scope,
                               outside_seconds=outside, reserve_seconds=reserve)
        self.fixed_at, self.fit_clock = step, now
        return f"[rayssl] {self.plan.line()}"

    def _refit(self, step: int, started: float, reserve_s: float) -> str:
        """A re-timing (``rayssl.train.budget.refit_due``): the total fixed again at the rate of
        the steps since the last fit."""
        now = time.time()
        rate = (now - self.fit_clock) / (step - self.fixed_at)
        seconds, spent, _, reserve = self._clock(now, rate, started, reserve_s)
        total = budget_total(self.cfg.train.budget_seconds, spent, step, seconds, self.cap_steps, reserve)
        self.plan = self.plan.refit(step, total, self.batch.images_per_step / seconds, total == self.cap_steps)
        self.fixed_at, self.fit_clock = step, now
        return (f"[rayssl] re-timed at step {step:,}: {total:,} steps in all "
                f"({self.plan.epochs:.1f} epochs) at {self.plan.images_per_second:,.0f} img/s")

    def _clock(self, now: float, seconds_per_step: float, started: float, reserve: float) -> list[float]:
        """``[seconds_per_step, spent, outside, reserve]`` of ``rayssl.train.budget``, each the
        largest over the ranks."""
        job = self.cfg.train.time_budget_scope == "job"
        return dist.all_max(torch.tensor([
            seconds_per_step,
            now - self.job_started if job else self.used_seconds + now - started,
            started - self.job_started if job else 0.0,
            reserve if job else 0.0], dtype=torch.float64)).tolist()

    def _timed(self) -> tuple[int, int]:
        """The steps this launch times (``measure_window``)."""
        return measure_window(self.start_step, self._warmup()[0])

    def _warmup(self) -> tuple[int, str]:
        """The longest warm-up of the run in steps, and its config key."""
        o, obj = self.cfg.optim, self.cfg.objective
        return max((round(o.warmup_epochs * self.steps_per_epoch), "optim.warmup_epochs"),
                   (round(obj.teacher_temperature_warmup_epochs * self.steps_per_epoch),
                    "objective.teacher_temperature_warmup_epochs"))

    def _build(self, total: int, hold_until: int) -> dict[str, np.ndarray]:
        return build_schedules(self.cfg, self.steps_per_epoch, self.batch.global_batch, total, hold_until)
