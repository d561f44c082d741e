"""Reliability pieces without Ray: intact checkpoints, the non-finite guard, the collapse alarm."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from rayssl import checkpoint as checkpoints
from rayssl.config import load_config
from rayssl.eval.backbone import read_checkpoint
from rayssl.models import build_encoder, make_teacher
from rayssl.monitor import CollapseAlarm
from rayssl.objective import ClusterObjective
from rayssl.schedules import build_schedules
from rayssl.train.step import NonFiniteError, Stepper, build_optimizer

FS = pyarrow.fs.LocalFileSystem()


def write_run(root: Path, steps: list[int]) -> list[Path]:
    folders = []
    for i, step in enumerate(steps):
        folder = root / f"checkpoint_2026-11-29_00-00-0{i}"
        folder.mkdir(parents=True)
        checkpoints.save({"step": step, "teacher": {"w": torch.full((3,), float(step))}, "config": {}, "meta": {}},
                         folder)
        folders.append(folder)
    return folders


def test_newest_intact_checkpoint_wins_and_damaged_ones_are_skipped(tmp_path: Path) -> None:
    folders = write_run(tmp_path / "run", [3, 6, 9])
    assert checkpoints.latest_intact(FS, str(tmp_path / "run"))[1]["step"] == 9

    state_file = folders[2] / checkpoints.CHECKPOINT_FILE  # truncated while copying
    state_file.write_bytes(state_file.read_bytes()[:-10])
    (folders[1] / checkpoints.MANIFEST_FILE).unlink()  # cut short before its manifest
    partial = tmp_path / "run" / "checkpoint_2026-11-29_00-00-09"  # an upload that never finished
    partial.mkdir()
    (partial / checkpoints.CHECKPOINT_FILE).write_bytes(b"\x80\x02")

    skipped: list[str] = []
    folder, state = checkpoints.latest_intact(FS, str(tmp_path / "run"), skipped)
    assert state["step"] == 3 and folder == str(folders[0])
    assert skipped == [str(folders[2])]  # folders without a manifest rank last: never before an intact one
    assert checkpoints.candidates(FS, str(tmp_path / "run"))[-2:] == [str(partial), str(folders[1])]
    assert read_checkpoint(str(tmp_path / "run"))["step"] == 3  # evaluate/load_backbone agree

    same_size = bytearray((folders[0] / checkpoints.CHECKPOINT_FILE).read_bytes())
    same_size[-20] ^= 0xFF  # a flipped byte: the size matches, the hash does not
    (folders[0] / checkpoints.CHECKPOINT_FILE).write_bytes(bytes(same_size))
    assert checkpoints.latest_intact(FS, str(tmp_path / "run")) is None
    with pytest.raises(checkpoints.CheckpointError, match=r"run: no intact checkpoint_\* folder"):
        read_checkpoint(str(tmp_path / "run"))
    with pytest.raises(checkpoints.CheckpointError, match="incomplete or corrupt"):
        read_checkpoint(str(folders[2]))


def tiny_stepper(*overrides: str) -> Stepper:
    cfg = load_config(None, ["model.width=4", "model.head_hidden_dim=16", "model.head_bottleneck_dim=8",
                             "objective.num_clusters=8", "optim.warmup_epochs=0", "objective.prior_momentum=0.5",
                             *overrides])
    torch.manual_seed(0)
    student = build_encoder(cfg.model, 1, 28, cfg.objective.num_clusters)
    objective = ClusterObjective(cfg.objective)
    schedules = build_schedules(cfg, 10, 8)
    return Stepper(student, make_teacher(student), objective, build_optimizer(student, cfg.optim), schedules,
                   cfg, 10, torch.device("cpu"), False)


def views(nan: bool = False) -> list[torch.Tensor]:
    out = [torch.randn(8, 1, 28, 28), torch.randn(8, 1, 28, 28), torch.randn(8, 1, 14, 14), torch.randn(8, 1, 14, 14)]
    if nan:
        out[2][0, 0, 0, 0] = float("nan")  # a student-only view: the loss is NaN, the teacher is fine
    return out


def test_nonfinite_steps_are_skipped_without_any_update_then_stop() -> None:
    stepper = tiny_stepper("train.skip_nonfinite=1")
    stepper.micro_batch(views(), 0, True)
    assert len(stepper.finish(0)) == 1
    before = copy.deepcopy(stepper.state_dict())

    stepper.micro_batch(views(nan=True), 1, True)
    assert stepper.finish(1) == []  # skipped
    after = stepper.state_dict()
    for part in ("student", "teacher", "objective"):
        for key, value in before[part].items():
            assert torch.equal(value, after[part][key]), (part, key)
    assert after["optimizer"]["state"][0]["step"] == before["optimizer"]["state"][0]["step"]
    assert stepper.nonfinite_steps == 1 and after["nonfinite_steps"] == 1

    stepper.micro_batch(views(), 2, True)
    assert len(stepper.finish(2)) == 1  # training goes on
    stepper.micro_batch(views(nan=True), 3, True)
    with pytest.raises(NonFiniteError, match=r"^non-finite loss at step 4 \(train.skip_nonfinite=1, 2 seen\)$"):
        stepper.finish(3)


# (step, norm/effective_clusters, norm/mutual_information) as logged by three runs of the modes
# table at the default recipe (docs/benchmarks.md; MLflow experiment rayssl-modes-default, 234
# steps per epoch, K = 256): the calibration runs of benchmarks/alarm_calibration.py closest to
# the threshold from either side. The none run is the collapsed one that stays highest in its
# first epoch, the center run the healthy one that goes lowest; the prior run starts with a lower
# I(X;K) than the none run.
NONE_S2 = [(20, 8.05, 0.874), (40, 4.06, 1.107), (60, 3.41, 1.049), (80, 3.21, 1.038), (100, 3.09, 1.014),
           (120, 2.88, 0.963), (140, 2.79, 0.929), (160, 2.77, 0.940), (180, 2.49, 0.850), (200, 2.53, 0.868),
           (220, 2.24, 0.761), (240, 2.29, 0.790), (260, 2.36, 0.816), (280, 2.45, 0.864)]
CENTER_S2 = [(20, 49.12, 1.220), (40, 8.67, 1.361), (60, 10.05, 1.542), (80, 16.38, 1.694), (100, 6.63, 1.565),
             (120, 10.90, 1.767), (140, 8.57, 1.698), (160, 13.43, 1.913), (180, 10.06, 1.799), (200, 10.00, 1.858),
             (220, 11.30, 2.007), (240, 11.59, 2.037), (260, 11.83, 2.051), (280, 12.40, 2.170), (300, 12.62, 2.133),
             (320, 13.22, 2.143), (340, 13.78, 2.199), (360, 13.73, 2.195), (380, 13.67, 2.231), (400, 13.34, 2.192),
             (420, 13.80, 2.199), (440, 13.34, 2.186), (460, 13.96, 2.244), (468, 13.57, 2.186)]
PRIOR_S0 = [(20, 255.63, 0.853), (40, 253.54, 1.252), (60, 250.77, 1.712), (80, 243.26, 2.053), (100, 237.04, 2.286),
            (120, 235.64, 2.476), (140, 231.20, 2.644), (160, 225.65, 2.800), (180, 235.31, 2.815), (200, 221.48, 2.930),
            (220, 225.62, 2.964), (240, 222.77, 3.043)]


def replay(history: list[tuple], *overrides: str) -> list[tuple[int, str]]:
    """(step, text) of every alarm the default monitor config (plus ``overrides``) raises."""
    alarm = CollapseAlarm.of(load_config(None, list(overrides)).monitor)
    fired = [(step, alarm.observe(step, {"norm/effective_clusters": eff, "norm/mutual_information": mi}))
             for step, eff, mi in history]
    return [(step, text) for step, text in fired if text]


def test_collapse_alarm_catches_partial_collapse_within_one_epoch_and_spares_healthy_runs() -> None:
    [(step, text)] = replay(NONE_S2)
    assert step <= 234  # within the first epoch
    assert text.startswith(f"collapse at step {step}: norm/effective_clusters 2.24 stayed below "
                           "monitor.min_effective_clusters=7 for 10 logged steps (monitor.patience)")
    assert "objective.mode=prior" in text
    assert replay(CENTER_S2) == [] and replay(PRIOR_S0) == []
    # the I(X;K) rule alone (the alarm before [5/5]) stays silent on this collapse at any patience
    assert replay(NONE_S2, "monitor.min_effective_clusters=1", "monitor.patience=1") == []


def test_collapse_alarm_needs_patience_consecutive_low_steps_and_fires_once() -> None:
    alarm = CollapseAlarm.of(load_config(None, ["monitor.patience=3"]).monitor)
    effective = [200.0, 2.0, 3.0, 150.0, 2.0, 1.0, 6.0, 2.0, 1.0]
    fired = [step for step, eff in enumerate(effective, 1)
             if alarm.observe(step, {"norm/effective_clusters": eff, "norm/mutual_information": 0.5})]
    assert fired == [7]
    assert alarm.observe(10, {"loss": 1.0}) is None  # steps without the diagnostics do not count


def test_collapse_alarm_catches_uniform_collapse_by_mutual_information() -> None:
    """Every posterior flat: the effective clusters look perfect (near K), only I(X;K) shows it."""
    history = [(step, 255.9, mi) for step, mi in enumerate([0.9, 0.04, 0.01, 0.2, 0.01, 0.0, 0.0], 1)]
    [(step, text)] = replay(history, "monitor.patience=3")
    assert step == 7 and text.startswith("collapse at step 7: norm/mutual_information 0 nats stayed below "
                                         "monitor.min_mutual_information=0.05 for 3 logged steps")
    assert "uniform collapse" in text and "objective.teacher_temperature" in text


def test_effective_cluster_threshold_must_be_below_k() -> None:
    """At or above K the effective clusters (at most K) would always be low: refused up front."""
    from rayssl.config import ConfigError

    with pytest.raises(ConfigError, match=r"^monitor.min_effective_clusters: 7 is not below objective.num_clusters 6"):
        load_config(None, ["objective.num_clusters=6"])
    load_config(None, ["objective.num_clusters=6", "monitor.min_effective_clusters=1"])  # 1: the rule off, accepted
