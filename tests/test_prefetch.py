"""``rayssl.train.prefetch.Ahead``: order, the bound on how far it runs ahead, errors, stopping."""

from __future__ import annotations

import time

import pytest

from rayssl.train.prefetch import Ahead


def _wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_results_in_order_and_no_more_than_depth_ahead(depth: int) -> None:
    made = []

    def fn(x: int) -> int:
        made.append(x)
        return x * 10

    ahead = Ahead(range(20), fn, depth)
    time.sleep(0.2)  # the thread fills the queue, then one more call waits to be put
    assert len(made) <= depth + (1 if depth else 0)
    _wait_for(lambda: len(made) >= depth)
    assert len(made) >= depth  # it does work ahead
    assert list(ahead) == [x * 10 for x in range(20)]
    assert next(ahead, "end") == "end"


def test_an_error_reaches_the_consumer_in_its_place() -> None:
    def fn(x: int) -> int:
        if x == 3:
            raise ValueError("bad batch 3")
        return x

    ahead = Ahead(range(10), fn, 2)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad batch 3"):
        next(ahead)
    assert next(ahead, "end") == "end"


def test_close_stops_the_thread_and_the_source() -> None:
    pulled = []

    def source():
        for i in range(10_000):
            pulled.append(i)
            yield i

    ahead = Ahead(source(), lambda x: x, 2)
    assert next(ahead) == 0
    ahead.close()
    _wait_for(lambda: not ahead.thread.is_alive())
    assert not ahead.thread.is_alive() and len(pulled) < 10
    assert next(ahead, "end") == "end"
