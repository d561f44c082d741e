"""What the user sees: rayssl's lines and one live progress bar; Ray's own logs go to files.

Driver side, ``quiet_ray_logs()`` before ``ray.init(log_to_driver=False)`` keeps the console
handlers of Ray's and Ray Data's loggers for errors only (their log files keep everything),
and ``Console`` renders what rank 0 sends through a Ray queue: lines above the bar, progress
as the bar (in a terminal) or as one line per logged step (a log file, ``ray job submit``).
Worker side, ``Channel`` is what ``TrainRun`` calls; without a console (Ray-free tests, Tune
trials) it writes to stdout as before. ``run.verbose=true`` (``--verbose``) shows Ray's logs too.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def quiet_ray_logs() -> None:
    """Keep Ray's and Ray Data's driver-side console handlers for errors only (their file
    handlers, Ray Data's ``ray-data.log`` in the session's log folder, keep every level) and turn
    off Ray Data's own progress bars (planning a read draws one)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)
    _short_node_deaths()


def _short_node_deaths() -> None:
    """A node whose raylet dies makes Ray print, on the driver's console and whatever
    ``log_to_driver`` says, its first line ("Raylet is terminated ...") and the raylet's last log
    lines (20-40 ``[state-dump]`` lines). The console keeps that first line; the whole message goes
    to the ``ray`` logger (``rayssl-driver.log``). Wraps Ray's ``print_to_stdstream`` once."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "rayssl_short", False):
        return

    def printed(data: dict, ignore_prefix: bool) -> None:
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any("[state-dump]" in line for line in lines):
            for line in lines:
                logging.getLogger("ray").warning("%s", line)
            head = [re.sub(r"\s*Last \d+ lines of the Raylet logs:.*", "", line.split("\n", 1)[0]) for line in lines
                    if line.strip() and not line.lstrip().startswith("[state-dump]")]
            data = {**data, "lines": [f"{line} (the raylet's last log lines: rayssl-driver.log in Ray's log folder)"
                                      for line in head[:1]]}
        original(data, ignore_prefix)

    printed.rayssl_short = True
    ray_worker.print_to_stdstream = printed


def driver_log(logs_dir: str | None) -> str | None:
    """Send the ``ray`` logger's records (every level) to ``<logs_dir>/rayssl-driver.log``, beside
    Ray's worker logs; its path, or None without a log folder."""
    if not logs_dir:
        return None
    path = str(Path(logs_dir) / "rayssl-driver.log")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s %(name)s -- %(message)s"))
    logging.getLogger("ray").addHandler(handler)
    return path


@dataclass
class Progress:
    """One logged step, for the bar."""

    step: int
    total: int
    epoch: float
    loss: float
    mutual_information: float
    images_per_second: float

    def postfix(self) -> str:
        return (f"epoch {self.epoch:.2f} loss {self.loss:.3f} I(X;K) {self.mutual_information:.2f} "
                f"{self.images_per_second:.0f} img/s")


class Channel:
    """Rank 0's side: ``say(line)`` and ``progress(line, Progress)`` to the driver's ``Console``
    through its queue, or to stdout without one (or when the queue is gone: a lost node)."""

    def __init__(self, queue: Any = None) -> None:
        self.queue = queue

    def _send(self, item: tuple) -> None:
        if self.queue is not None:
            try:
                self.queue.put(item, timeout=10)
                return
            except Exception:  # noqa: BLE001 - the driver's queue actor died or is full: print here instead
                self.queue = None
        sys.stdout.write(item[1] + "\n")
        sys.stdout.flush()

    def say(self, line: str) -> None:
        self._send(("line", line))

    def progress(self, line: str, progress: Progress) -> None:
        self._send(("progress", line, progress))


class Console:
    """The driver's console for one run: ``with Console() as console:`` pass ``console.queue`` to
    rank 0 (``Channel``); a thread prints its lines and draws the bar until the block ends."""

    def __init__(self, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.use_bar = self.stream.isatty() if bar is None else bar
        self.queue = None
        self.bar: tqdm | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="rayssl-console", daemon=True)

    def __enter__(self) -> "Console":
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._close_bar()
        self.queue.shutdown()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self.show(self.queue.get(timeout=0.2))
            except Empty:
                if self._stop.is_set():
                    return

    def show(self, item: tuple) -> None:
        """One item from rank 0: a line, or a logged step (bar, or its line without a bar)."""
        if item[0] == "progress" and self.use_bar:
            self._update(item[2])
            return
        if self.bar is not None:
            self.bar.write(item[1], file=self.stream)
        else:
            self.stream.write(item[1] + "\n")
            self.stream.flush()

    def _update(self, p: Progress) -> None:
        if self.bar is None:
            self.bar = tqdm(total=p.total, initial=p.step, unit="step", file=self.stream, dynamic_ncols=True,
                            desc="[rayssl] training", smoothing=0.1, mininterval=0)
        self.bar.total = p.total  # a budgeted run's total is fixed after its first timed steps
        self.bar.set_postfix_str(p.postfix(), refresh=False)
        self.bar.update(p.step - self.bar.n)  # negative after a restart from an older checkpoint
        if p.step >= p.total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
