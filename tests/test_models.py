"""Tests for rayssl.models: backbones, cluster head, encoder, teacher and EMA."""

from functools import cache
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models import VisionTransformer

from rayssl.models import BACKBONES, ClusterHead, Encoder, build_encoder, ema_update, make_teacher
from rayssl.models.backbones import build_backbone

FEATURE_DIMS = {"convnet4": 64, "resnet18": 512, "resnet50": 2048, "vit_tiny": 192, "vit_small": 384}


def model_cfg(backbone: str = "convnet4", **overrides) -> SimpleNamespace:
    """A small model config."""
    cfg = dict(backbone=backbone, small_stem=True, width=8, head_hidden_dim=32, head_bottleneck_dim=16, head_layers=3,
               head_norm=False)
    return SimpleNamespace(**{**cfg, **overrides})


@cache
def small_encoder(backbone: str) -> Encoder:
    """A seeded 10-cluster encoder for 1-channel 28 px images, in eval mode."""
    torch.manual_seed(0)
    return build_encoder(model_cfg(backbone), in_chans=1, image_size=28, num_clusters=10).eval()


@pytest.mark.parametrize("name", BACKBONES)
@torch.no_grad()
def test_backbone_output_shapes(name: str) -> None:
    backbone, dim = build_backbone(name, in_chans=1, image_size=28, small_stem=True, width=8)
    assert dim == FEATURE_DIMS[name]
    for size in (28, 14):
        out = backbone(torch.randn(2, 1, size, size))
        assert out.shape == (2, dim) and torch.isfinite(out).all()
    rgb, rgb_dim = build_backbone(name, in_chans=3, image_size=32, small_stem=True, width=8)
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, rgb_dim) == (2, dim)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
@torch.no_grad()
def test_backbone_large_image_variant(name: str) -> None:
    backbone, dim = build_backbone(name, in_chans=3, image_size=80, small_stem=False, width=8)
    if name == "vit_tiny":
        assert backbone.patch_size == 16
    assert backbone(torch.randn(2, 3, 80, 80)).shape == (2, dim)
    assert backbone(torch.randn(2, 3, 48, 48)).shape == (2, dim)


@settings(max_examples=15, deadline=None)
@given(size=st.integers(8, 40), in_chans=st.sampled_from([1, 3]))
@torch.no_grad()
def test_convnet4_accepts_any_size_from_8(size: int, in_chans: int) -> None:
    backbone, dim = build_backbone("convnet4", in_chans=in_chans, image_size=28, small_stem=False, width=4)
    assert backbone(torch.randn(2, in_chans, size, size)).shape == (2, dim)


def test_convnet4_default_width_has_about_1_5m_params() -> None:
    backbone, dim = build_backbone("convnet4", in_chans=1, image_size=28, small_stem=False, width=64)
    assert dim == 512
    assert 1.4e6 < sum(p.numel() for p in backbone.parameters()) < 1.7e6


def test_resnet_stem() -> None:
    small, _ = build_backbone("resnet18", in_chans=1, image_size=28, small_stem=True, width=8)
    large, _ = build_backbone("resnet18", in_chans=1, image_size=224, small_stem=False, width=8)
    assert small.conv1.stride == (1, 1) and small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.stride == (2, 2) and large.conv1.in_channels == 1 and isinstance(large.maxpool, nn.MaxPool2d)


def test_vit_matches_torchvision_at_native_size() -> None:
    torch.manual_seed(0)
    vit, _ = build_backbone("vit_tiny", in_chans=1, image_size=28, small_stem=True, width=8)
    vit.eval()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(vit(x), VisionTransformer.forward(vit, x))


def test_vit_handles_rectangular_and_smaller_grids() -> None:
    vit, dim = build_backbone("vit_tiny", in_chans=3, image_size=32, small_stem=True, width=8)
    assert vit(torch.randn(1, 3, 32, 20)).shape == (1, dim)
    assert vit(torch.randn(1, 3, 16, 16)).shape == (1, dim)


def test_unknown_backbone_raises() -> None:
    with pytest.raises(ValueError, match=r"model\.backbone.*'resnet9'.*convnet4, resnet18, resnet50, vit_tiny"):
        build_backbone("resnet9", in_chans=1, image_size=28, small_stem=True, width=8)
    with pytest.raises(ValueError, match=r"model\.backbone"):
        build_encoder(model_cfg("nope"), in_chans=1, image_size=28, num_clusters=10)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(1e-3, 1e3), num_layers=st.integers(1, 4))
def test_head_outputs_cosine_similarities(scale: float, num_layers: int) -> None:
    head = ClusterHead(12, 7, hidden_dim=24, bottleneck_dim=8, num_layers=num_layers)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == num_layers
    logits = head(scale * torch.randn(5, 12))
    assert logits.shape == (5, 7)
    assert logits.abs().max() <= 1 + 1e-5
    row_norms = head.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(7))


def test_head_prototype_magnitude_frozen() -> None:
    head = ClusterHead(12, 7, hidden_dim=24, bottleneck_dim=8)
    magnitude = head.prototypes.parametrizations.weight.original0
    direction = head.prototypes.parametrizations.weight.original1
    assert not magnitude.requires_grad
    assert {id(p) for p in head.prototype_parameters()} == {id(magnitude), id(direction)}
    before = direction.detach().clone()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(5, 12)).pow(2).sum().backward()
    opt.step()
    assert torch.equal(magnitude, torch.ones_like(magnitude))
    assert not torch.equal(direction, before)
    trainable = ClusterHead(12, 7, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert trainable.prototypes.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_head_norm_puts_batchnorm_after_hidden_layers_only(num_layers: int) -> None:
    head = ClusterHead(12, 7, hidden_dim=24, bottleneck_dim=8, num_layers=num_layers, norm=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU"] * (num_layers - 1) + ["Linear"]
    head.train()
    hidden = head.mlp[:2](3 + 5 * torch.randn(64, 12)) if num_layers > 1 else None
    if hidden is not None:  # batch statistics: each hidden unit has mean 0 and variance 1
        torch.testing.assert_close(hidden.mean(0), torch.zeros(24), atol=1e-5, rtol=0)


def test_prototype_logits_stay_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    head = ClusterHead(12, 7, hidden_dim=24, bottleneck_dim=8)
    x = torch.randn(5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
    assert logits.dtype == torch.float32
    exact = head.prototypes(torch.nn.functional.normalize(head.mlp(x).float(), dim=-1))
    # the MLP ran in bf16 (about 3 significant digits), the cosine logits did not lose more
    torch.testing.assert_close(logits, exact, atol=3e-2, rtol=0)


@pytest.mark.parametrize("backbone", ["convnet4", "vit_tiny"])
def test_encoder_output_shape_and_matches_per_view(backbone: str) -> None:
    encoder = small_encoder(backbone)
    views = [torch.randn(3, 1, s, s) for s in (28, 28, 14, 14, 14)]
    with torch.no_grad():
        out = encoder(views)
        separate = torch.stack([encoder.head(encoder.features(v)) for v in views])
    assert out.shape == (5, 3, 10)
    torch.testing.assert_close(out, separate, rtol=1e-4, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.sampled_from([28, 14, 20]), min_size=1, max_size=5))
def test_encoder_any_view_order_matches_per_view(sizes: list[int]) -> None:
    encoder = small_encoder("convnet4")
    views = [torch.randn(2, 1, s, s) for s in sizes]
    with torch.no_grad():
        out = encoder(views)
        separate = torch.stack([encoder([v])[0] for v in views])
    assert out.shape == (len(sizes), 2, 10)
    torch.testing.assert_close(out, separate, rtol=1e-4, atol=1e-5)


def test_build_encoder_uses_config() -> None:
    cfg = model_cfg("convnet4", width=4, head_hidden_dim=20, head_bottleneck_dim=6, head_layers=2)
    encoder = build_encoder(cfg, in_chans=3, image_size=32, num_clusters=13)
    linears = [m for m in encoder.head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 20), (20, 6)]
    assert encoder.features(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert encoder([torch.randn(2, 3, 32, 32)]).shape == (1, 2, 13)


def test_make_teacher_is_independent_and_frozen() -> None:
    student = build_encoder(model_cfg(), in_chans=1, image_size=28, num_clusters=10)
    teacher = make_teacher(student)
    assert isinstance(teacher, Encoder)
    student_ptrs = {t.data_ptr() for t in [*student.parameters(), *student.buffers()]}
    assert student_ptrs.isdisjoint(t.data_ptr() for t in [*teacher.parameters(), *teacher.buffers()])
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for n, p in student.named_parameters() if not n.endswith("original0"))
    x = [torch.randn(2, 1, 28, 28)]
    torch.testing.assert_close(teacher.eval()(x), student.eval()(x))


def _pair() -> tuple[Encoder, Encoder]:
    torch.manual_seed(0)
    teacher = make_teacher(build_encoder(model_cfg(), in_chans=1, image_size=28, num_clusters=10))
    student = build_encoder(model_cfg(), in_chans=1, image_size=28, num_clusters=10)
    return teacher, student


@settings(max_examples=10, deadline=None)
@given(momentum=st.floats(0.0, 1.0))
def test_ema_update_interpolates(momentum: float) -> None:
    teacher, student = _pair()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, momentum)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, momentum * t0 + (1 - momentum) * s)


def test_ema_update_extremes_and_buffers() -> None:
    teacher, student = _pair()
    before = [p.clone() for p in teacher.parameters()]
    student([torch.randn(4, 1, 28, 28)])  # train mode: changes the student's BN running stats
    teacher_buffers = [b.clone() for b in teacher.buffers()]
    ema_update(teacher, student, 1.0)
    assert all(torch.equal(t, t0) for t, t0 in zip(teacher.parameters(), before))
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    assert all(torch.equal(b, b0) for b, b0 in zip(teacher.buffers(), teacher_buffers))
    assert not all(torch.equal(b, s) for b, s in zip(teacher.buffers(), student.buffers()))


def test_ema_update_and_make_teacher_unwrap_ddp(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        teacher, student = _pair()
        wrapped = DistributedDataParallel(student)
        ema_update(teacher, wrapped, 0.5)
        assert isinstance(make_teacher(wrapped), Encoder)
    finally:
        dist.destroy_process_group()
    t0, _ = _pair()
    for t, t_init, s in zip(teacher.parameters(), t0.parameters(), student.parameters()):
        torch.testing.assert_close(t, (t_init + s) / 2)
