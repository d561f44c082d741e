"""benchmarks/gpu_check.sh --dry-run: the GPU check's plan runs on the CPU, and a broken step fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("cuda", "tests", "step", "pipeline", "objective")


def dry_run(tmp_path: Path, overrides: str = "", *steps: str) -> subprocess.CompletedProcess:
    """The dry run (of ``steps`` only, if named) in a clean environment, as ``env -i`` would
    leave it: no ``OUT``, so the results go to the default, ``$TMPDIR/gpu_check`` in ``tmp_path``."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"], "TMPDIR": str(tmp_path),
           "PYTHON": sys.executable, "GPU_CHECK_OVERRIDES": overrides}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", *steps], env=env,
                          capture_output=True, text=True, timeout=400)


@pytest.mark.slow  # every step of the script, each in its own interpreter
def test_dry_run_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = dry_run(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in STEPS:
        assert f"[gpu_check] {name}: start" in out.stdout
    assert "[gpu_check] step: rayssl " in out.stdout and "ratio" in out.stdout
    assert "[gpu_check] objective: K = 256" in out.stdout
    assert out.stdout.rstrip().endswith("[gpu_check] all steps passed")


@pytest.mark.slow  # the script's steps, each in its own interpreter
def test_a_broken_step_stops_the_check_and_is_named(tmp_path: Path) -> None:
    """A misspelt override breaks the first rayssl step (the step rate): the check exits 1 there."""
    out = dry_run(tmp_path, "objective.tempreature=0.1")
    assert out.returncode == 1
    assert "[gpu_check] step: FAILED" in out.stderr and "tempreature" in out.stderr
    assert "all steps passed" not in out.stdout and "pipeline: start" not in out.stdout


def test_the_pipeline_step_alone_in_a_clean_environment(tmp_path: Path) -> None:
    """The pipeline step alone, the first that reads ``OUT`` (it failed with ``KeyError: 'OUT'``
    when ``OUT`` came from the script's default rather than the caller's environment)."""
    out = dry_run(tmp_path, "", "pipeline")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[gpu_check] pipeline: config checked" in out.stdout and "step: start" not in out.stdout
    assert out.stdout.rstrip().endswith("[gpu_check] pipeline passed") and (tmp_path / "gpu_check").is_dir()


def test_an_unknown_step_is_refused(tmp_path: Path) -> None:
    out = dry_run(tmp_path, "", "pipline")
    assert out.returncode == 2 and "unknown argument 'pipline'" in out.stderr and "start" not in out.stdout
