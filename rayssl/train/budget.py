"""``train.time_budget``: a run's length in wall-clock time instead of epochs.

The budget covers training (``train.time_budget_scope=training``, the default) or the whole
job (``job``: from the process's start to its exit, Ray start-up, shard build and baselines
included, with the final k-NN's time kept back). A budgeted run cannot know its number of
optimizer steps before it has trained a few, so it times them and then fixes the total once:

1. steps ``start + SETTLE_STEPS`` to ``measure_end`` (at least ``MEASURE_STEPS`` of them, and
   on to the end of the LR warm-up) are timed; every rank takes the slowest rank's seconds per
   step, so all ranks fix the same total;
2. the total is the steps done plus the steps that fit the budget left at that rate:

       T = t_fix + floor((MARGIN * B - spent - reserve) / seconds_per_step),   at most ``train.epochs`` epochs

   with B the budget and ``spent`` the training seconds of all launches so far (scope
   ``training``), or the seconds since the job started (scope ``job``), where ``reserve`` is
   the final k-NN's time, measured by the baselines' k-NN of the same network at random
   init (0 in scope ``training``, or when no baselines ran);
3. every schedule is rebuilt over T (``rayssl.schedules.build_schedules``);
4. a machine's speed drifts (a busier host, CPU steal on a shared VM: by tens of percent within
   minutes on the 2-core VMs of docs/benchmarks.md), so at ``REFITS`` points (every eighth of the way from t_fix to T) the run times the
   steps since the last fit and fixes T again by the same formula; the
   rest of every schedule is stretched or squeezed over the new remainder, its shape kept
   (``rayssl.schedules.stretch``);
5. the plan (T, each re-fit) goes into every checkpoint and the final T into the MLflow
   param ``train.total_steps``; a resumed, restarted or resized run takes the recorded plan
   and never measures again, on a faster machine or a slower one.

Up to t_fix every schedule holds its warm-up or start value (the cosines start at t_fix), so
the timed steps ran on exactly the values of the final arrays: the schedules are exact. Only
the last eighth runs on a rate timed before it: a machine that slows down there overruns
the budget by as much, one that speeds up ends early.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

SETTLE_STEPS = 50  # first steps of a launch, not timed: they run off the run's median, both ways (docs/benchmarks.md)
MEASURE_STEPS = 100  # the fewest timed steps
MARGIN = 0.97  # of the budget planned for: checkpoints, epoch boundaries and the machine's own spread
REFITS = 7  # re-timings after the first fix, every eighth of the way to the total (each one checkpointed)
REFIT_MIN_STEPS = 100  # the fewest steps a re-timing times (since the last fit)

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(min|h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0}


class BudgetError(ValueError):
    """A budget string that does not parse, or a budget too short for the run; one line."""


def parse_duration(text: str | float | int) -> float:
    """Seconds of a duration: ``"90s"``, ``"12m"``, ``"8h"``, ``"1h30m"``, ``"2.5m"``, or a
    number of seconds; ``BudgetError`` (one line) for anything else or a duration <= 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip().lower()
        parts = _DURATION.findall(value)
        if not parts or _DURATION.sub("", value).strip():
            raise BudgetError("expected a duration such as 90s, 12m, 8h or 1h30m")
        seconds = sum(float(n) * _UNIT[unit] for n, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise BudgetError("expected a positive duration such as 90s, 12m, 8h or 1h30m")
    return seconds


def measure_window(start_step: int, warmup_steps: int) -> tuple[int, int]:
    """``(first, last)``: the steps whose times give the rate, in a launch that starts at
    ``start_step`` (the clock reads after step ``first`` and after step ``last``)."""
    first = start_step + SETTLE_STEPS
    return first, max(first + MEASURE_STEPS, warmup_steps)


def budget_total(budget_s: float, spent_s: float, step: int, seconds_per_step: float, cap_steps: int,
                 reserve_s: float = 0.0) -> int:
    """T = ``step`` + the steps that fit ``MARGIN * budget_s - spent_s - reserve_s`` at
    ``seconds_per_step``, at most ``cap_steps`` (``train.epochs``) and at least one step more
    than ``step`` (the steps already taken), so that the last step ends every schedule at its
    end value; ``step`` itself when that is the cap."""
    left = max(MARGIN * budget_s - spent_s - reserve_s, 0.0)
    return min(cap_steps, step + max(1, math.floor(left / seconds_per_step)))


def refit_due(step: int, timed_until: int, total: int, done: int, last_fit: int) -> bool:
    """Whether ``step`` is the next re-timing point: ``done`` of ``REFITS`` re-fits made, the
    next at ``timed_until + (done + 1) / (REFITS + 1)`` of the way to the current ``total``,
    and at least ``REFIT_MIN_STEPS`` after the last fit (``last_fit``): a total cut short by a slow
    stretch brings the next points closer, and a few steps time nothing."""
    return (done < REFITS and step < total and step - last_fit >= REFIT_MIN_STEPS
            and (step - timed_until) * (REFITS + 1) >= (done + 1) * (total - timed_until))


def check_budget(time_budget: str, budget_s: float, seconds_per_step: float, warmup_steps: int,
                 warmup_key: str, outside_s: float = 0.0) -> None:
    """``BudgetError`` (one line) when the budget, less ``outside_s`` (scope ``job``: the
    start-up, baselines and final k-NN), buys fewer steps at the measured rate than the warm-up
    (``warmup_steps`` of ``warmup_key``): such a run would never train past it."""
    bought = max(math.floor((MARGIN * budget_s - outside_s) / seconds_per_step), 0)
    if bought < warmup_steps:
        besides = f" besides {outside_s / 60:.1f} min of start-up and evaluation" if outside_s else ""
        raise BudgetError(
            f"train.time_budget: {time_budget} buys {bought} steps{besides} at {seconds_per_step:.2f} s a step, "
            f"fewer than the {warmup_steps} steps of {warmup_key}; raise the budget or shorten the warm-up")


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget bought: ``total_steps`` at the measured ``images_per_second``."""

    time_budget: str
    total_steps: int
    steps_per_epoch: int
    images_per_second: float
    timed_until: int  # the step where the total was fixed: the schedules' cosines start there
    capped: bool = False  # the total hit train.epochs before the budget ran out
    scope: str = "training"  # train.time_budget_scope
    outside_seconds: float = 0.0  # scope job: start-up and baselines before the first training step
    reserve_seconds: float = 0.0  # scope job: kept back for the final k-NN
    refits: tuple[tuple[int, int], ...] = ()  # (step, new total) of each re-timing
    first_total: int = 0  # the total fixed at timed_until (0: total_steps, before any re-fit)

    def __post_init__(self) -> None:  # from a checkpoint's lists
        object.__setattr__(self, "refits", tuple((int(a), int(b)) for a, b in self.refits))
        object.__setattr__(self, "first_total", self.first_total or self.total_steps)

    def refit(self, step: int, total: int, images_per_second: float, capped: bool) -> BudgetPlan:
        """The plan re-timed at ``step``: ``total`` steps at the rate timed since the last fit."""
        return replace(self, total_steps=total, images_per_second=images_per_second,
                       refits=(*self.refits, (step, total)), capped=capped)

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def line(self) -> str:
        """``budget <B>: <T> steps (<E> epochs) at <rate> img/s``; scope job: ``budget <B> for the
        job: <T> steps (<E> epochs) at <rate> img/s, after <M> min of start-up and baselines, <R>
        min kept for the final k-NN``."""
        cap = ", the train.epochs cap" if self.capped else ""
        if self.refits:
            cap += f", re-timed at steps {', '.join(f'{step:,}' for step, _ in self.refits)}"
        line = (f"budget {self.time_budget}{' for the job' if self.scope == 'job' else ''}: "
                f"{self.total_steps:,} steps ({self.epochs:.1f} epochs{cap}) at {self.images_per_second:,.0f} img/s")
        if self.scope == "job":
            line += (f", after {self.outside_seconds / 60:.1f} min of start-up and baselines, "
                     f"{self.reserve_seconds / 60:.1f} min kept for the final k-NN")
        return line

    def to_dict(self) -> dict:
        return {"time_budget": self.time_budget, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "images_per_second": self.images_per_second,
                "timed_until": self.timed_until, "capped": self.capped, "scope": self.scope,
                "outside_seconds": self.outside_seconds, "reserve_seconds": self.reserve_seconds,
                "refits": [list(r) for r in self.refits], "first_total": self.first_total}
