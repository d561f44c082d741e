"""Per-step schedules, each one precomputed array from one cosine function (as DINO)."""

from __future__ import annotations

import numpy as np


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0, hold_until: int = 0) -> np.ndarray:
    """Linear warmup from ``warmup_start`` to ``start``, held at ``start`` up to step
    ``hold_until``, then cosine from ``start`` to ``end``:

        v(t) = end + (start - end) * (1 + cos(pi * t / T)) / 2,   t = 0 .. T-1 after the warmup and hold
    """
    warmup_steps = min(warmup_steps, total_steps)
    hold = min(max(hold_until - warmup_steps, 0), total_steps - warmup_steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps - hold)
    decay = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warm, np.full(hold, float(start)), decay])


def total_steps(cfg, steps_per_epoch: int) -> int:
    """A run's optimizer steps from ``train.epochs``: its length without ``train.time_budget``,
    the cap with one (``rayssl.train.budget``)."""
    return max(1, round(cfg.train.epochs * steps_per_epoch))


def build_schedules(cfg, steps_per_epoch: int, global_batch: int, total: int | None = None,
                    hold_until: int = 0) -> dict[str, np.ndarray]:
    """All schedules of a run, indexed by optimizer step, each spanning ``total`` steps
    (default ``total_steps``; a budgeted run's fixed total, ``rayssl.train.budget``). The cosines
    start at ``hold_until`` (a budgeted run's timed steps, before the total is known): up to
    there every schedule is at its warm-up or start value, which do not depend on the total.

    - ``lr``: linear warmup, then cosine to ``optim.min_lr``; the peak is ``optim.lr`` scaled
      by global_batch / 256 (the linear scaling rule);
    - ``wd``: cosine from ``optim.weight_decay`` to ``optim.weight_decay_end``;
    - ``momentum``: teacher EMA momentum, cosine from ``optim.teacher_momentum`` to ``..._end``;
    - ``teacher_temperature``: linear warmup from ``objective.teacher_temperature_warmup``,
      then constant.
    """
    total = total or total_steps(cfg, steps_per_epoch)
    o, obj = cfg.optim, cfg.objective
    peak = o.lr * global_batch / 256
    warm_t = min(total, round(obj.teacher_temperature_warmup_epochs * steps_per_epoch))
    return {
        "lr": cosine_schedule(peak, o.min_lr, total, round(o.warmup_epochs * steps_per_epoch), hold_until=hold_until),
        "wd": cosine_schedule(o.weight_decay, o.weight_decay_end, total, hold_until=hold_until),
        "momentum": cosine_schedule(o.teacher_momentum, o.teacher_momentum_end, total, hold_until=hold_until),
        "teacher_temperature": np.concatenate([
            np.linspace(obj.teacher_temperature_warmup, obj.teacher_temperature, warm_t, endpoint=False),
            np.full(total - warm_t, obj.teacher_temperature)]),
    }


def stretch(schedules: dict[str, np.ndarray], at: int, total: int) -> dict[str, np.ndarray]:
    """Every schedule re-laid over a new ``total`` from step ``at`` on (a budgeted run's re-timing,
    ``rayssl.train.budget``): steps before ``at`` keep their values, the rest of each curve is
    resampled so that its shape runs from ``at`` to the new last step, ending at its end value:

        v'(t) = v(at + (t - at) * (n - 1) / (n' - 1)),   n = len(v) - at,  n' = total - at

    (one step left, n' = 1: its end value).
    """
    out = {}
    for name, v in schedules.items():
        n, n_new = len(v) - at, total - at
        x = at + np.arange(n_new) * ((n - 1) / (n_new - 1)) if n_new > 1 else np.full(n_new, len(v) - 1.0)
        out[name] = np.concatenate([v[:at], np.interp(x, np.arange(len(v)), v)])
    return out


def online_knn_every(cfg, steps_per_epoch: int) -> int:
    """Steps between online k-NN evaluations (0: none): ``eval.every_epochs`` rounded to the
    nearest multiple of ``train.log_every``, since evaluations happen at logged steps."""
    if not cfg.eval.every_epochs:
        return 0
    every = cfg.eval.every_epochs * steps_per_epoch
    return max(1, round(every / cfg.train.log_every)) * cfg.train.log_every


def knn_evaluations(cfg, steps_per_epoch: int) -> int:
    """Teacher k-NN results one run reports: the online ones before the last step, and the final one
    (at most that many for a budgeted run, which may end before ``train.epochs``)."""
    total = total_steps(cfg, steps_per_epoch)
    every = online_knn_every(cfg, steps_per_epoch)
    return (len(range(every, total, every)) if every else 0) + 1
