"""``train.time_budget``: a run's length in wall-clock training time instead of epochs.

A budgeted run cannot know its number of optimizer steps before it has trained a few, so it
times them and then fixes the total once:

1. steps ``start + SETTLE_STEPS`` to ``measure_end`` (at least ``MEASURE_STEPS`` of them, and
   on to the end of the LR warm-up) are timed; every rank takes the slowest rank's seconds per
   step, so all ranks fix the same total;
2. the total is the steps done plus the steps that fit the budget left at that rate:

       T = t_fix + floor((MARGIN * B - used) / seconds_per_step),   at most ``train.epochs`` epochs

   with B the budget and ``used`` the training seconds spent so far (all launches);
3. every schedule is rebuilt over T (``rayssl.schedules.build_schedules``); T goes into every
   checkpoint and the MLflow param ``train.total_steps``, and a resumed, restarted or resized
   run takes it from there: it never measures again, on a faster machine or a slower one.

Up to t_fix every schedule holds its warm-up or start value (the cosines start at t_fix), so
the timed steps ran on exactly the values of the final arrays: the schedules are exact. The
rate is timed once: a machine that slows down later (a busier host, CPU steal on a shared VM)
overruns the budget by as much, one that speeds up ends early.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SETTLE_STEPS = 50  # first steps of a launch, not timed: they ran 12-20 % off the run's median, both ways (docs/benchmarks.md)
MEASURE_STEPS = 100  # the fewest timed steps
MARGIN = 0.97  # of the budget planned for: checkpoints, epoch boundaries and the machine's own spread

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


def budget_total(budget_s: float, used_s: float, step: int, seconds_per_step: float, cap_steps: int) -> int:
    """T = ``step`` + the steps that fit ``MARGIN * budget_s - used_s`` at ``seconds_per_step``,
    at most ``cap_steps`` (``train.epochs``) and at least ``step`` (the steps already taken)."""
    left = max(MARGIN * budget_s - used_s, 0.0)
    return max(step, min(cap_steps, step + math.floor(left / seconds_per_step)))


def check_budget(time_budget: str, budget_s: float, seconds_per_step: float, warmup_steps: int,
                 warmup_key: str) -> None:
    """``BudgetError`` (one line) when the whole budget, at the measured rate, buys fewer steps
    than the warm-up (``warmup_steps`` of ``warmup_key``): such a run would never train past it."""
    bought = math.floor(MARGIN * budget_s / seconds_per_step)
    if bought < warmup_steps:
        raise BudgetError(
            f"train.time_budget: {time_budget} buys {bought} steps at {seconds_per_step:.2f} s a step, fewer "
            f"than the {warmup_steps} steps of {warmup_key}; raise the budget or shorten the warm-up")


@dataclass(frozen=True)
class BudgetPlan:
    """What a budget bought: ``total_steps`` at the measured ``images_per_second``."""

    time_budget: str
    total_steps: int
    steps_per_epoch: int
    images_per_second: float
    timed_until: int  # the step where the total was fixed: the schedules' cosines start there
    capped: bool = False  # the total hit train.epochs before the budget ran out

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def line(self) -> str:
        """``budget 12m: 2,140 steps (9.1 epochs) at 470 img/s``."""
        cap = ", the train.epochs cap" if self.capped else ""
        return (f"budget {self.time_budget}: {self.total_steps:,} steps ({self.epochs:.1f} epochs{cap}) "
                f"at {self.images_per_second:,.0f} img/s")

    def to_dict(self) -> dict:
        return {"time_budget": self.time_budget, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch, "images_per_second": self.images_per_second,
                "timed_until": self.timed_until, "capped": self.capped}
