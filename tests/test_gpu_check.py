"""benchmarks/gpu_check.sh --dry-run: the GPU check's plan runs on the CPU, and a broken step fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("cuda", "tests", "step", "pipeline", "objective")


def dry_run(tmp_path: Path, overrides: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "GPU_CHECK_OVERRIDES": overrides}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=400)


def test_dry_run_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = dry_run(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in STEPS:
        assert f"[gpu_check] {name}: start" in out.stdout
    assert "[gpu_check] step: rayssl " in out.stdout and "ratio" in out.stdout
    assert "[gpu_check] objective: K = 256" in out.stdout
    assert out.stdout.rstrip().endswith("[gpu_check] all steps passed")


def test_a_broken_step_stops_the_check_and_is_named(tmp_path: Path) -> None:
    """A misspelt override breaks the first rayssl step (the step rate): the check exits 1 there."""
    out = dry_run(tmp_path, "objective.tempreature=0.1")
    assert out.returncode == 1
    assert "[gpu_check] step: FAILED" in out.stderr and "tempreature" in out.stderr
    assert "all steps passed" not in out.stdout and "pipeline: start" not in out.stdout
