"""What the user sees (``rayssl.console``): rank 0's lines, the progress bar, Ray's logs kept off the console."""

from __future__ import annotations

import io
import logging

from rayssl.console import Channel, Console, Progress, driver_log, quiet_ray_logs


def step(n: int, total: int = 100) -> tuple:
    p = Progress(n, total, n / 50, 5.0 - n / 100, 0.5 + n / 100, 900.0 + n)
    return ("progress", f"[rayssl] step {n}/{total}", p)


def test_without_a_terminal_every_item_is_one_line() -> None:
    out = io.StringIO()
    console = Console(out)  # a StringIO is no terminal: lines, as in a log file or ``ray job submit``
    for item in (("line", "[rayssl] k-NN baselines: ..."), step(20), step(40)):
        console.show(item)
    assert out.getvalue().splitlines() == ["[rayssl] k-NN baselines: ...", "[rayssl] step 20/100",
                                           "[rayssl] step 40/100"]


def test_in_a_terminal_steps_move_one_bar_and_lines_print_above_it() -> None:
    out = io.StringIO()
    console = Console(out, bar=True)
    console.show(step(20))
    console.show(("line", "[rayssl] checkpoint of step 20: /runs/x/checkpoint_1"))
    console.show(step(60))
    assert console.bar is not None and console.bar.n == 60
    console.show(step(40))  # a restart from an older checkpoint moves the bar back
    assert console.bar.n == 40
    console.show(step(100))  # the last step closes the bar; later lines print plainly
    assert console.bar is None
    console.show(("line", "[rayssl] teacher k-NN 87.00%"))
    text = out.getvalue()
    assert "[rayssl] step" not in text  # steps draw the bar, not lines
    assert "[rayssl] training" in text and "60/100" in text and "I(X;K) 1.10" in text and "960 img/s" in text
    assert "[rayssl] checkpoint of step 20: /runs/x/checkpoint_1\n" in text
    assert text.endswith("[rayssl] teacher k-NN 87.00%\n")


def test_a_channel_without_a_console_prints(capsys) -> None:
    channel = Channel()
    channel.say("[rayssl] hello")
    channel.progress("[rayssl] step 1/2", step(1, 2)[2])
    assert capsys.readouterr().out == "[rayssl] hello\n[rayssl] step 1/2\n"


def test_a_channel_whose_queue_is_gone_prints_instead(capsys) -> None:
    class Gone:
        def put(self, item, timeout=None):
            raise ConnectionError("the queue actor died with its node")

    channel = Channel(Gone())
    channel.say("[rayssl] still here")
    channel.say("[rayssl] and again")
    assert channel.queue is None
    assert capsys.readouterr().out == "[rayssl] still here\n[rayssl] and again\n"


def test_quiet_ray_logs_keeps_errors_on_the_console_and_everything_in_the_file(tmp_path, monkeypatch,
                                                                               capsys) -> None:
    """Errors on the console, everything in the file; a dead node's message keeps its first line on
    the console and its raylet's ``[state-dump]`` lines in the file; other lines pass unchanged."""
    import ray  # noqa: F401 - installs Ray's console handler on the "ray" logger
    import ray._private.worker as ray_worker
    import ray.data

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)  # put back after
    died = ("Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL by the user. "
            "Last 20 lines of the Raylet logs:\n" + "\n".join(f"    [state-dump] \tHandler{i} - 1 total" for i in range(20)))

    logger = logging.getLogger("ray.rayssl_console_test")  # no handlers of its own: the "ray" logger's
    console = [h for h in logging.getLogger("ray").handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    screen = io.StringIO()
    saved = [(h.level, h.setStream(screen)) for h in console]  # the console handler writes here
    progress = ray.data.DataContext.get_current().enable_progress_bars
    path = driver_log(str(tmp_path))
    try:
        quiet_ray_logs()
        assert all(h.level == logging.ERROR for h in console) and console
        assert not ray.data.DataContext.get_current().enable_progress_bars
        logger.warning("a warning for the log file only")
        logger.error("an error for both")
        ray_worker.print_to_stdstream({"lines": [died], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"lines": ["a worker's own line"], "pid": 4242, "is_err": False},
                                      ignore_prefix=False)
    finally:
        for h, (level, stream) in zip(console, saved):
            h.setLevel(level)
            h.setStream(stream)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        for h in [h for h in logging.getLogger("ray").handlers if getattr(h, "baseFilename", None) == path]:
            logging.getLogger("ray").removeHandler(h)
            h.close()
    assert "an error for both" in screen.getvalue() and "a warning for the log file only" not in screen.getvalue()
    logged = (tmp_path / "rayssl-driver.log").read_text()
    assert "a warning for the log file only" in logged and "an error for both" in logged
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2 and "[state-dump]" not in shown[0] and "Last 20 lines" not in shown[0], shown
    assert shown[0].endswith("Raylet is terminated. Termination is unexpected. Possible reasons include: (1) SIGKILL "
                             "by the user. (the raylet's last log lines: rayssl-driver.log in Ray's log folder)")
    assert shown[1].endswith("a worker's own line")
    assert logged.count("[state-dump]") == 20
