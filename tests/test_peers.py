"""benchmarks/peers.py end to end on a few hundred images, every arm but the Ray job's: each arm
trains for its budget and is scored, and a second invocation resumes (skips what is done)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["lightly_dino_example", "lightly_dino_tuned", "lightly_loss_in_rayssl_harness",
        "rayssl_none", "rayssl_center", "rayssl_prior", "rayssl_sinkhorn"]


def peers(out: Path, fashion_mnist_dir: str) -> str:
    cmd = [sys.executable, str(ROOT / "benchmarks/peers.py"), "--dataset", "fashion-mnist", "--budget", "2s",
           "--seeds", "0", "--limit", "300", "--inline", "--loader-workers", "0", "--data-dir", fashion_mnist_dir,
           "--out", str(out), "--arms", *ARMS, "--tuned", "output_dim=256", "batch_norm=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_peers_runs_every_arm_and_resumes(tmp_path, fashion_mnist_dir):
    out = tmp_path / "peers.json"
    first = peers(out, fashion_mnist_dir)
    results = json.loads(out.read_text())
    assert set(results["arms"]) == set(ARMS)
    for arm, seeds in results["arms"].items():
        row = seeds["0"]
        assert 0.0 <= row["knn"] <= 1.0 and 0.0 <= row["linear"] <= 1.0, (arm, row)
        assert math.isfinite(row["knn"]) and row["steps"] > 0 and row["images_per_second"] > 0, (arm, row)
        assert 1.5 <= row["train_seconds"] <= 10, (arm, row["train_seconds"])  # the budget, not more
        assert len(row["curve"]) >= 2 and row["curve"][-1][0] == row["train_seconds"], (arm, row["curve"])
    assert results["arms"]["lightly_dino_tuned"]["0"]["knobs"]["output_dim"] == 256
    assert "effective_clusters" in results["arms"]["rayssl_prior"]["0"]
    assert set(results["baselines"]) == {"raw_pixels", "random_init"}
    assert "| rayssl_prior | 1 |" in first and (tmp_path / "peers.png").stat().st_size > 0

    second = peers(out, fashion_mnist_dir)
    assert second.count("done, skipped") == len(ARMS)
    assert json.loads(out.read_text()) == results  # nothing re-ran
