"""train.precision: which steps run under bf16 autocast."""

import pytest
import torch

from rayssl.train import step
from rayssl.train.step import use_bf16


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_precision_is_obeyed_on_any_device(device: str) -> None:
    assert use_bf16("bf16", torch.device(device)) is True
    assert use_bf16("fp32", torch.device(device)) is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_uses_bf16_on_gpus_and_on_cpus_with_native_bf16_only(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: native)
    assert use_bf16("auto", torch.device("cuda")) is True
    assert use_bf16("auto", torch.device("cpu")) is native


def test_cpu_flag_detection_reads_cpuinfo(monkeypatch, tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(step, "Path", lambda _: cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse2 avx512f avx512bw\n")
    assert not step.cpu_has_bf16()
    cpuinfo.write_text("flags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert step.cpu_has_bf16()
    cpuinfo.unlink()
    assert not step.cpu_has_bf16()
