"""Batches turned into views a few batches ahead, in a background thread of the training worker.

Decoding and cropping (``rayssl.train.views.Views``) run in torch and PIL kernels that release
the GIL, so one thread can prepare the next batches while the training step runs. The queue
bounds how far it runs ahead (``data.prefetch_batches``): the crop work is spread over the
epoch instead of arriving as one burst when a new pass starts.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()
POLL_S = 1.0  # how often a waiting consumer's ``waiting`` is called


class Ahead:
    """``fn(item)`` for each item of ``items``, in order, computed up to ``depth`` items ahead in a
    daemon thread (``depth`` 0: in the caller's thread, when it asks). An exception in the thread
    is raised to the caller at its place in the order; ``close()`` (or running out) stops the thread.
    ``waiting(seconds)``, when given, is called about every ``POLL_S`` while the caller waits for
    an item (the stall watchdog; it may raise). With ``depth`` 0 the caller's thread does the
    waiting itself, and nothing watches it."""

    def __init__(self, items: Iterable[Any], fn: Callable[[Any], Any], depth: int,
                 waiting: Callable[[float], None] | None = None) -> None:
        self.items, self.fn, self.depth, self.done, self.waiting = iter(items), fn, depth, False, waiting
        if depth:
            self.queue: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._fill, name="rayssl-prefetch", daemon=True)
            self.thread.start()

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self.items:
                if not self._put((True, self.fn(item))):
                    return
            self._put((True, _END))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            self._put((False, err))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        if not self.depth:
            return self.fn(next(self.items))
        ok, value = self._get()
        if not ok or value is _END:
            self.close()
            if not ok:
                raise value
            raise StopIteration
        return value

    def _get(self) -> tuple[bool, Any]:
        if self.waiting is None:
            return self.queue.get()
        started = time.monotonic()
        while True:
            try:
                return self.queue.get(timeout=POLL_S)
            except queue.Empty:
                self.waiting(time.monotonic() - started)

    def close(self) -> None:
        """Stop the thread (it drops what it has made); the iterator then ends."""
        self.done = True
        if self.depth:
            self.stop.set()
