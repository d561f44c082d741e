"""``benchmarks/epoch_boundary.py``'s window report: boundary windows apart, short windows ignored."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from epoch_boundary import windows_report  # noqa: E402


def test_boundary_windows_and_the_short_last_window() -> None:
    # 50 steps per epoch, a window every 20 steps; 60 and 120 hold a boundary, 142 is 2 steps long
    speeds = {20: 1000.0, 40: 1000.0, 60: 500.0, 80: 1000.0, 100: 900.0, 120: 450.0, 140: 1000.0, 142: 300.0}
    report = windows_report("r", speeds, steps_per_epoch=50)
    assert report["windows"] == 7 and report["slowest_step"] == 120
    assert report["min_over_median"] == 0.45
    assert report["boundary_windows_median"] == 475.0 and report["other_windows_median"] == 1000.0
