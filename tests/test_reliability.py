"""Reliability pieces without Ray: intact checkpoints, the non-finite guard, the collapse alarm."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from rayssl import checkpoint as checkpoints
from rayssl.config import load_config
from rayssl.eval.checkpoint import read_checkpoint
from rayssl.models import build_encoder, make_teacher
from rayssl.monitor import CollapseAlarm
from rayssl.objective import ClusterObjective, ObjectiveSpec
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
    objective = ClusterObjective(ObjectiveSpec.from_mapping(cfg.objective.model_dump()))
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


def test_collapse_alarm_needs_patience_consecutive_low_steps_and_fires_once() -> None:
    alarm = CollapseAlarm(threshold=0.05, patience=3)
    values = [1.0, 0.01, 0.02, 0.3, 0.01, 0.0, 0.04, 0.01, 0.0]
    fired = [step for step, v in enumerate(values, 1)
             if alarm.observe(step, {"norm/mutual_information": v, "norm/marginal_entropy": 0.1})]
    assert fired == [7]
    assert alarm.observe(10, {"loss": 1.0}) is None  # steps without the diagnostics do not count
    text = CollapseAlarm(0.05, 1).observe(4, {"norm/mutual_information": 0.01})
    assert text.startswith("collapse at step 4: I(X;K) of the normalised teacher 0.010 nats")
