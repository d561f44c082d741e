"""``--help`` is generated from the config model's field descriptions: every key has one, every
job that takes config keys lists them, and no description carries a measurement that goes stale."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, create_model

from rayssl.config import Config, TrainConfig, _known_keys, config_fields, help_text

ROOT = Path(__file__).resolve().parents[1]

# a measured speed, time or score: it goes stale, so it belongs in docs/benchmarks.md, not in a description
STALE = re.compile(r"\d[\d,.]*\s*(img/s|images/s|ms\b|min\b|minutes\b|s/step)|\d[\d.]*\s*x\s+(faster|slower)"
                   r"|\d[\d.]*\s*%|\d[\d.]*\s+(k-NN\s+)?points\b", re.IGNORECASE)


def undescribed(model=Config) -> list[str]:
    """The dotted keys of ``model`` without a description."""
    return [key for key, field in config_fields(model) if not (field.description or "").strip()]


def job_help(script: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_config_key_has_a_description() -> None:
    assert [key for key, _ in config_fields()] == _known_keys() and len(_known_keys()) > 90
    assert undescribed() == []


def test_every_sweep_key_has_a_description() -> None:
    from rayssl.tune import SweepConfig

    assert undescribed(SweepConfig) == []


def test_a_key_added_without_a_description_is_caught() -> None:
    bare = create_model("BareTrain", __base__=TrainConfig, new_knob=(int, 1),
                        blank_knob=(int, Field(2, description="  ")))
    config = create_model("BareConfig", __base__=Config, train=(bare, bare()))
    assert undescribed(config) == ["train.new_knob", "train.blank_knob"]
    assert "  train.new_knob: int = 1\n" in help_text(config)


def test_help_text_groups_keys_by_section_with_type_default_and_description() -> None:
    text = help_text()
    for key, field in config_fields():
        assert f"\n  {key}: " in text
    assert [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")] == \
        list(Config.model_fields)
    assert "  objective.mode: none | center | prior | sinkhorn = prior\n" in text
    assert "  optim.teacher_momentum: float in [0, 1] = 0.99\n" in text
    assert "  data.image_size: int > 0 | null = null\n" in text
    assert "near 0 means collapse" in " ".join(text.split())
    assert all(len(line) <= 100 for line in text.splitlines() if line.startswith("      "))
    only_eval = help_text(sections=("eval",))
    assert only_eval.startswith("eval: ") and "\n  data." not in only_eval and "\n  eval.center: " in only_eval


def test_pretrain_help_lists_every_key() -> None:
    out = job_help("pretrain.py")
    assert "python jobs/pretrain.py --config configs/fashion_mnist.yaml" in out  # the usage examples
    missing = [key for key in _known_keys() if f"  {key}: " not in out]
    assert not missing, missing


def test_sweep_and_evaluate_help_list_their_keys() -> None:
    from rayssl.tune import SweepConfig

    out = job_help("sweep.py")
    assert "lograndint" in out and "trials.csv" in out  # the space syntax and the advice stay
    assert all(f"  sweep.{name}: " in out for name in SweepConfig.model_fields)
    assert all(f"  {key}: " in out for key in _known_keys())
    out = job_help("evaluate.py")
    assert "--actors N" in out and "knn/top1_kK" in out
    assert all(f"  {key}: " in out for key in _known_keys() if key.split(".")[0] in ("data", "eval"))


@pytest.mark.parametrize("stale", ["548 img/s", "about 2x faster", "0.5 min of start-up", "+1.9 k-NN points",
                                   "+0.47 points", "57.9 %", "12 ms a step"])
def test_the_stale_pattern_finds_measurements(stale: str) -> None:
    assert STALE.search(stale)


def test_no_description_carries_a_measurement() -> None:
    stale = {key: m.group(0) for key, field in config_fields() if (m := STALE.search(field.description or ""))}
    assert not stale, f"measurements go stale: move them to docs/benchmarks.md and point there: {stale}"
