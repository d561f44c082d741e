"""``Window``: one launch's training clock and the metrics window of its logged steps.

The clock starts when this launch's first batch arrives (the wait for it is start-up): the
ETA, ``train_seconds``, the stall watchdog's step time and the budget's spent seconds count
training only. Each logged step closes a window of losses, images and data wait.
"""

from __future__ import annotations

import time

import torch


class Window:
    """This launch's training clock (``started``) and the current metrics window."""

    def __init__(self) -> None:
        self.fed = False  # whether this launch has had its first training batch
        self.restart()

    def restart(self) -> None:
        """The training clock and a new window, from now."""
        self.started = time.time()
        self.reset()

    def reset(self) -> None:
        """A new metrics window: losses, images, data wait."""
        self.losses: list[torch.Tensor] = []
        self.opened, self.images, self.wait = time.time(), 0, 0.0

    def got_batch(self, asked: float) -> float | None:
        """A training batch asked for at ``asked`` arrived. This launch's first ends the start-up:
        its seconds (since the window opened) are returned and the clock restarts. Any later
        batch's wait is data wait."""
        if not self.fed:
            self.fed, seconds = True, time.time() - self.opened
            self.restart()
            return seconds
        self.wait += time.time() - asked
        return None

    def loss(self) -> float:
        """The window's mean loss (nan when every step in it was skipped)."""
        return float(torch.stack(self.losses).mean()) if self.losses else float("nan")

    def rates(self) -> tuple[float, float]:
        """``(images_per_second, data_wait_fraction)`` of the window so far."""
        elapsed = time.time() - self.opened
        return self.images / elapsed, self.wait / elapsed

    def progress_line(self, metrics: dict, step: int, start_step: int, total: int) -> str:
        """The console's line of a logged step, with the ETA at this launch's step time."""
        eta = (time.time() - self.started) / max(step - start_step, 1) * (total - step)
        return (f"[rayssl] step {step}/{total} ({100 * step / total:.0f}%) "
                f"epoch {metrics['epoch']:.2f} loss {metrics['loss']:.3f} "
                f"I(X;K) {metrics['norm/mutual_information']:.2f} "
                f"eff.clusters {metrics['norm/effective_clusters']:.0f} "
                f"{metrics['images_per_second']:.0f} img/s ETA {eta / 60:.1f} min")
