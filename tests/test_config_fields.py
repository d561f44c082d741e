"""Every field of the config refuses a value of the wrong type and, where it has a range or a
set of choices, a value outside it: one line naming the field, no traceback, through the
dotted command line and through a YAML file (the model is walked, so a new field is covered)."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import annotated_types as at
import pytest
import yaml
from pydantic import BaseModel

from rayssl.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def fields(model: type[BaseModel] = Config, prefix: str = ""):
    """``(dotted key, annotation, constraints)`` of every leaf field."""
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            yield from fields(f.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f.annotation, list(f.metadata)


def _flat(annotation) -> tuple[list, list]:
    """The constraints and the Literal choices inside ``annotation`` (Optional, Annotated, unions)."""
    constraints, choices = [], []
    for arg in typing.get_args(annotation):
        if isinstance(arg, (at.Gt, at.Ge, at.Lt, at.Le, at.MinLen)):
            constraints.append(arg)
        else:
            c, ch = _flat(arg)
            constraints, choices = constraints + c, choices + ch
    if typing.get_origin(annotation) is typing.Literal:
        choices += list(typing.get_args(annotation))
    return constraints, choices


def wrong_type(annotation):
    return ["a", "list"] if typing.get_origin(annotation) is dict else {"not": "a value"}


def out_of_range(annotation, metadata) -> list:
    constraints, choices = _flat(annotation)
    values = []
    for c in constraints + metadata:
        if isinstance(c, at.Gt):
            values.append(c.gt)
        elif isinstance(c, at.Ge):
            values.append(c.ge - 1)
        elif isinstance(c, at.Lt):
            values.append(c.lt)
        elif isinstance(c, at.Le):
            values.append(c.le + 1)
        elif isinstance(c, at.MinLen):
            values.append("")
    if choices:
        values.append("no-such-choice")
    return values


CASES = [(key, value) for key, annotation, metadata in fields()
         for value in [wrong_type(annotation), *out_of_range(annotation, metadata)]]


def test_the_walk_covers_the_model() -> None:
    keys = {key for key, _ in CASES}
    assert len(keys) == len(list(fields())) > 90 and "train.time_budget_scope" in keys
    assert ("optim.teacher_momentum", 2.0) in CASES and ("train.precision", "no-such-choice") in CASES


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={v!r}" for k, v in CASES])
def test_a_bad_value_is_one_line_naming_the_field(key, value, tmp_path) -> None:
    flow = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    section, name = key.split(".")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({section: {name: value}}))
    for load in (lambda: load_config(None, [f"{key}={flow}"]), lambda: load_config(path)):
        with pytest.raises(ConfigError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{key}: "), message


def test_the_job_says_it_in_one_line_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain.py"), "optim.teacher_momentum=2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("config error: optim.teacher_momentum: ")
