"""A stopped job stops cleanly: ``ray job stop``, a deleted RayJob (both SIGTERM), Ctrl-C (SIGINT).

Driver side, ``StopSignals.run`` runs Ray Train's ``fit`` in a thread while the main thread
holds SIGTERM and SIGINT. The first one becomes a *stop request*: a key in Ray's internal KV
store, which rank 0 reads between steps (``StopPoll``, at most every ``POLL_SECONDS``). Every
rank agrees on it with one collective (``rayssl.dist.largest``), finishes its step, and the
run writes a checkpoint of that step and returns ``stopped="signal"`` (``rayssl.train.run``).
The driver waits ``run.stop_timeout`` seconds for that, and no longer: it then marks the MLflow
run KILLED and the job exits 130 (SIGINT) or 143 (SIGTERM). A second signal ends the wait at once.

Under ``ray job submit``, ``ray job stop`` SIGKILLs the job ``RAY_JOB_STOP_WAIT_TIME_S`` seconds
(Ray's default 3) after its SIGTERM; the driver reads the same variable and ends its wait
``MARGIN_SECONDS`` before that, so the run is marked KILLED even when the checkpoint cannot be
(``grace`` says so when the job starts).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

NAMESPACE = "rayssl"  # of the stop keys in Ray's internal KV store
POLL_SECONDS = 0.5  # rank 0 reads the key at most this often
MARGIN_SECONDS = 2.0  # the driver's MLflow status and exit, before `ray job stop`'s SIGKILL
SIGNALS = (signal.SIGTERM, signal.SIGINT)
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the driver it starts
_RAY_DEFAULT_WAIT = 3  # JobSupervisor.DEFAULT_RAY_JOB_STOP_WAIT_TIME_S


class JobStopped(Exception):
    """The job stopped on a signal: the message is its one line, ``code`` its exit code.
    ``abandoned``: ``fit`` still runs in its thread, and Python's own shutdown (``ray.shutdown``
    at exit) would wait for it: exit with ``os._exit`` (Ray ends the job's workers when its driver
    is gone; a local Ray's processes die with their parent)."""

    def __init__(self, line: str, code: int, abandoned: bool = False) -> None:
        super().__init__(line)
        self.code, self.abandoned = code, abandoned


def exit_code(name: str) -> int:
    """The shell's code for a process ended by signal ``name``: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signal.Signals[name])


def job_stop_wait() -> int | None:
    """Under ``ray job submit``: the seconds ``ray job stop`` waits before its SIGKILL (the job
    supervisor's ``RAY_JOB_STOP_WAIT_TIME_S``, which the driver inherits, from the head's
    environment or the job's runtime_env env_vars); None for a driver started otherwise."""
    if _JOB_ENV not in os.environ:
        return None
    try:
        return int(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", _RAY_DEFAULT_WAIT))
    except ValueError:
        return _RAY_DEFAULT_WAIT


def grace(stop_timeout: float) -> tuple[float, str, str | None]:
    """``(seconds, bound, warning)``: how long the driver waits for the stop checkpoint, the
    setting that bounds it, and a warning when ``ray job stop`` would SIGKILL the job before
    ``run.stop_timeout`` ends (the wait then ends ``MARGIN_SECONDS`` before the SIGKILL)."""
    wait = job_stop_wait()
    if wait is None or wait >= stop_timeout + MARGIN_SECONDS:
        return stop_timeout, "run.stop_timeout", None
    cut = max(wait - MARGIN_SECONDS, 0.5)
    need = math.ceil(stop_timeout + 10)
    warning = (f"[rayssl] WARNING run.stop_timeout: `ray job stop` kills this job {wait} s after its SIGTERM "
               f"(RAY_JOB_STOP_WAIT_TIME_S), before run.stop_timeout={stop_timeout:g} s: a stopped run gets "
               f"{cut:g} s for its checkpoint; submit with --runtime-env-json "
               f"'{{\"env_vars\": {{\"RAY_JOB_STOP_WAIT_TIME_S\": \"{need}\"}}}}'")
    return cut, f"RAY_JOB_STOP_WAIT_TIME_S={wait}", warning


class Unfinished(Exception):
    """``StopSignals.run`` left ``fit`` running: ``forced`` by a second signal, else out of time."""

    def __init__(self, forced: bool) -> None:
        super().__init__("second signal" if forced else "stop timeout")
        self.forced = forced


class StopSignals:
    """Driver side: SIGTERM and SIGINT while ``run(fit)`` runs become a stop request.

    Only in the main thread (signals reach no other); elsewhere (a Tune trial) ``run`` just
    calls ``fit`` and ``key`` is None. ``signal``: the first signal's name once one came;
    ``timeout``: the seconds it waits after it, bounded by ``bound`` (a setting's name).
    """

    def __init__(self, stop_timeout: float, say: Callable[[str], None] = print) -> None:
        self.active = threading.current_thread() is threading.main_thread()
        self.key = f"stop-{uuid.uuid4().hex}" if self.active else None
        self.timeout, self.bound, warning = grace(stop_timeout)
        self.warning = warning if self.active else None  # a trial's driver is Tune's; it gets no request
        self.say = say
        self.signal: str | None = None
        self._received: list[int] = []

    def _handler(self, signum: int, frame: Any) -> None:
        self._received.append(signum)  # the main thread's loop acts on it

    def run(self, fit: Callable[[], Any]) -> Any:
        """``fit()``'s value (or its exception), ``fit`` running in a thread; ``Unfinished`` when a
        signal came and ``fit`` did not return within the timeout, or a second signal came."""
        if not self.active:
            return fit()
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["value"] = fit()
            except BaseException as err:  # noqa: BLE001 - raised again in the main thread
                outcome["error"] = err

        previous = {s: signal.signal(s, self._handler) for s in SIGNALS}
        thread = threading.Thread(target=target, name="rayssl-fit", daemon=True)
        try:
            thread.start()
            deadline = None
            while thread.is_alive():
                thread.join(0.2)
                if self._received and deadline is None:
                    deadline = time.monotonic() + self.timeout
                    self._request(signal.Signals(self._received[0]).name)
                if len(self._received) > 1 or (deadline is not None and time.monotonic() > deadline):
                    raise Unfinished(forced=len(self._received) > 1)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.signal:
                _kv(lambda kv: kv._internal_kv_del(self.key, namespace=NAMESPACE))
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _request(self, name: str) -> None:
        self.signal = name
        _kv(lambda kv: kv._internal_kv_put(self.key, name, namespace=NAMESPACE))
        self.say(f"[rayssl] {name}: stopping after the current step with a checkpoint, within {self.timeout:g} s "
                 f"({self.bound}); a second signal exits at once")


class StopPoll:
    """Rank 0's view of the driver's stop request: the signal's name, or None. Reads Ray's KV at
    most every ``every`` seconds (a GCS round trip), and once set it stays set."""

    def __init__(self, key: str | None, every: float = POLL_SECONDS) -> None:
        self.key, self.every = key, every
        self.seen: str | None = None
        self.read_at = -math.inf

    def __call__(self) -> str | None:
        now = time.monotonic()
        if self.key and self.seen is None and now - self.read_at >= self.every:
            self.read_at = now
            value = _kv(lambda kv: kv._internal_kv_get(self.key, namespace=NAMESPACE))
            self.seen = value.decode() if value else None
        return self.seen


def _kv(call: Callable[[Any], Any]) -> Any:
    """``call(ray.experimental.internal_kv)``; None if the GCS does not answer (the stop then
    falls back to the driver's timeout)."""
    from ray.experimental import internal_kv

    try:
        return call(internal_kv)
    except Exception:  # noqa: BLE001 - a stop request must never fail the run
        return None
