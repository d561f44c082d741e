"""Ray and MLflow stay at the edges: the core modules, and ``rayssl.load_backbone`` on a real
checkpoint, import neither (checked in a fresh interpreter: this one may hold them already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rayssl import checkpoint
from rayssl.config import load_config
from rayssl.data.meta import DataMeta
from rayssl.models import initial_encoder

CORE = ("rayssl", "rayssl.checkpoint", "rayssl.config", "rayssl.console", "rayssl.data.meta",
        "rayssl.data.shards", "rayssl.data.storage", "rayssl.eval.backbone", "rayssl.models",
        "rayssl.transforms")
EDGES = """
def edges():
    return sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))
"""


def run(code: str) -> dict:
    """What ``code`` (with ``sys``, ``json`` and ``edges()`` at hand) prints as JSON."""
    proc = subprocess.run([sys.executable, "-c", f"import json, sys\n{EDGES}\n{code}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_modules_import_no_ray() -> None:
    assert run(f"for m in {CORE!r}: __import__(m)\nprint(json.dumps({{'edges': edges()}}))") == {"edges": []}


def test_load_backbone_imports_no_ray(tmp_path) -> None:
    cfg = load_config(None, ["model.width=8", "model.head_hidden_dim=64", "model.head_bottleneck_dim=32",
                             "objective.num_clusters=32"])
    meta = DataMeta(4, 4, 1, 28, ("a", "b"), (0.3,), (0.35,))
    teacher = initial_encoder(cfg, meta.channels)
    checkpoint.save({"teacher": teacher.state_dict(), "config": cfg.redacted(mask=None), "meta": meta.to_dict(),
                     "step": 3}, tmp_path)
    out = run(f"""
import rayssl
rayssl.load_backbone
named = edges()
from PIL import Image
import torch
backbone, preprocess = rayssl.load_backbone({str(tmp_path)!r})
with torch.no_grad():
    features = backbone(preprocess(Image.new("L", (34, 40), 128))[None])
print(json.dumps({{"named": named, "loaded": edges(), "shape": list(features.shape)}}))
""")
    with torch.no_grad():
        dim = teacher.backbone.eval()(torch.zeros(1, 1, 28, 28)).shape[1]
    assert out == {"named": [], "loaded": [], "shape": [1, dim]}


def test_the_data_tasks_module_imports_no_torch() -> None:
    """Ray Data's read and decode tasks run ``rayssl.data.datasets``' functions: each of their
    processes imports that module, and torch with torchvision would add seconds of CPU and
    hundreds of MB to each (only the crop stage, ``data.decode_on=data``, imports them)."""
    out = run("import rayssl.data.datasets\n"
              "print(json.dumps(sorted(m for m in ('torch', 'torchvision', 'mlflow') if m in sys.modules)))")
    assert out == []


CUT_IMPORT = """
import os, sys
from rayssl.data import datasets

class Cut(BaseException):
    pass

class CutTorch:  # stops torch's import partway, after torch._C has registered its operators
    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "torch.functional":
            sys.meta_path.remove(self)
            raise self.error

sys.meta_path.insert(0, CutTorch({error}))
try:
    datasets.crop_modules()
except Cut:
    print("first: cut", flush=True)
try:
    import torch
except Exception as err:
    print(f"torch again: {{type(err).__name__}}", flush=True)
datasets.crop_modules()
print("returned", flush=True)
"""


@pytest.mark.slow  # two interpreters importing torch (seconds)
def test_a_data_task_process_whose_torch_import_was_cut_short_exits_for_a_fresh_one() -> None:
    """A Ray cancel (KeyboardInterrupt) inside the crop stage's torch import ends the process with
    EX_TEMPFAIL, so Ray reruns its task in a fresh one. An import cut by anything else leaves a
    process in which torch cannot be imported again (the control: a plain ``import torch`` fails);
    the stage's next call there exits the same way instead of failing the batch."""
    runs = {error: subprocess.run([sys.executable, "-c", CUT_IMPORT.format(error=error)], capture_output=True,
                                  text=True, timeout=120) for error in ("KeyboardInterrupt", "Cut")}
    cancel, other = runs["KeyboardInterrupt"], runs["Cut"]
    assert cancel.returncode == os.EX_TEMPFAIL and cancel.stdout == "", (cancel.stdout, cancel.stderr[-2000:])
    assert other.returncode == os.EX_TEMPFAIL, other.stderr[-2000:]
    lines = other.stdout.splitlines()
    assert lines[0] == "first: cut" and lines[1].startswith("torch again: ") and len(lines) == 2, other.stdout
