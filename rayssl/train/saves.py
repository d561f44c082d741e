"""``Saves``: rank 0's checkpoints in one launch, and the stops they and the driver cause.

A checkpoint is a state handed to ``Worker.report``. Its disk may not take it (``DiskFull``,
rank 0 only): no more checkpoints are offered, and every rank stops after its next step. The
driver's stop request (``Worker.stop_requested``, rank 0's) stops every rank the same way, with
a checkpoint of that step.
"""

from __future__ import annotations

from collections.abc import Callable

from rayssl import dist
from rayssl.checkpoint import DiskFull
from rayssl.train.worker import Worker

# stops that end the run FAILED, without the final k-NN; "unsafe_checkpoint": the checkpoint to resume from
# holds pickled objects (rayssl.checkpoint.UnsafeCheckpoint), so a restart would meet it again
FAILED_STOPS = ("nonfinite", "budget", "disk_full", "unsafe_checkpoint")
SIGNALLED = "signal"  # the driver's stop request (rayssl.train.stop): a checkpoint, no final k-NN, KILLED
DISK_FULL = "disk_full"  # a checkpoint its disk could not take (rayssl.checkpoint.DiskFull): no more checkpoints


class Saves:
    """Which steps are checkpointed, the last one that was, and the one its disk could not take."""

    def __init__(self, every: int) -> None:
        self.every = every  # train.checkpoint_every
        self.last = 0  # the step of the last checkpoint kept (0: none)
        self.disk_full: str | None = None  # rank 0: the checkpoint its disk could not take, until all ranks stop

    def due(self, step: int, total: int, fixed_at: int) -> bool:
        """Every ``train.checkpoint_every`` steps, at the end, and where the budget's total was
        fixed (``fixed_at``: so a restart finds it)."""
        return step % self.every == 0 or step == total or step == fixed_at

    def report(self, report: Callable[[dict, dict | None], None], metrics: dict, state: dict | None,
               step: int) -> str | None:
        """``report(metrics, state)``; a state's step becomes the last checkpoint. None, or the
        line on a checkpoint its disk could not take (then kept in ``disk_full``)."""
        try:
            report(metrics, state)
        except DiskFull as err:
            kept = f"the checkpoint of step {self.last} is intact" if self.last else "no checkpoint was saved"
            self.disk_full = f"{err}; {kept}: free space on that disk"
            return self.disk_full
        self.last = step if state is not None else self.last
        return None

    def kept(self) -> str:
        """What a failure leaves behind, for its line."""
        if self.last == 0:
            return "no checkpoint was saved"
        return f"nothing saved after the checkpoint of step {self.last}"

    def stop_request(self, worker: Worker, step: int) -> tuple[str, str] | None:
        """``(reason, detail)`` when every rank stops after ``step``: rank 0's last checkpoint did
        not fit on its disk, or the driver asked it to stop; else None. One collective per step,
        so that every rank stops after the same step, for the same reason."""
        why = worker.stop_requested() if worker.rank == 0 and not self.disk_full else None
        code = dist.largest(2 if self.disk_full else int(why is not None), worker.device)
        if code == 2:
            return DISK_FULL, self.disk_full or "rank 0's checkpoint did not fit on its disk"
        if code == 1:
            return SIGNALLED, f"{why or 'a signal'} at step {step}"  # the driver says the rest
        return None
