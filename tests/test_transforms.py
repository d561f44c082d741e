"""Tests for rayssl.transforms: MultiCrop and EvalPreprocess."""

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rayssl.transforms import EvalPreprocess, MultiCrop

MEAN = {1: (0.5,), 3: (0.4, 0.5, 0.6)}
STD = {1: (0.25,), 3: (0.2, 0.25, 0.3)}


def crop_cfg(**overrides) -> SimpleNamespace:
    """A small multi-crop config with every augmentation enabled."""
    cfg = dict(
        global_crop_size=28,
        global_crop_scale=(0.4, 1.0),
        local_crops=2,
        local_crop_size=14,
        local_crop_scale=(0.1, 0.4),
        flip_prob=0.5,
        rotation=0.0,
        color_jitter=0.5,
        blur_prob=0.5,
        solarize_prob=0.2,
    )
    return SimpleNamespace(**{**cfg, **overrides})


def make(channels: int = 1, **overrides) -> MultiCrop:
    return MultiCrop(crop_cfg(**overrides), channels, MEAN[channels], STD[channels])


def random_images(batch: int, channels: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8)


@settings(max_examples=20, deadline=None)
@given(
    channels=st.sampled_from([1, 3]),
    batch=st.integers(1, 4),
    local_crops=st.integers(0, 3),
    global_size=st.sampled_from([16, 28, 32]),
    local_size=st.sampled_from([8, 14]),
)
def test_output_count_shapes_dtypes(
    channels: int, batch: int, local_crops: int, global_size: int, local_size: int
) -> None:
    crop = make(channels, local_crops=local_crops, global_crop_size=global_size, local_crop_size=local_size)
    views = crop(random_images(batch, channels))
    assert len(views) == 2 + local_crops
    sizes = [global_size] * 2 + [local_size] * local_crops
    assert [tuple(v.shape) for v in views] == [(batch, channels, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 for v in views)


def test_each_sample_gets_its_own_crop() -> None:
    torch.manual_seed(0)
    image = random_images(1, 1)
    views = make(1)(image.expand(2, -1, -1, -1))
    for view in views:
        assert not torch.allclose(view[0], view[1])


def test_seeded_runs_are_reproducible() -> None:
    crop, images = make(3), random_images(3, 3)
    torch.manual_seed(1)
    first = crop(images)
    torch.manual_seed(1)
    second = crop(images)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_grayscale_jitter_varies_per_sample_and_keeps_one_channel() -> None:
    torch.manual_seed(0)
    crop = make(1, color_jitter=1.0, blur_prob=0.0, solarize_prob=0.0)
    views = crop(torch.full((64, 1, 32, 32), 100, dtype=torch.uint8))
    assert all(v.shape[1] == 1 for v in views)
    per_sample = views[0].flatten(1).mean(1)
    assert per_sample.std() > 0.05  # brightness/contrast differ between images


def test_colour_jitter_strength_is_torchvisions_brightness_range() -> None:
    """augment.color_jitter = s means ColorJitter(brightness=s): factors uniform in [1 - s, 1 + s],
    on 80 % of the images (a constant image isolates brightness: contrast keeps it)."""
    torch.manual_seed(0)
    s = 0.5
    crop = make(1, color_jitter=s, flip_prob=0.0, blur_prob=0.0, solarize_prob=0.0, local_crops=0)
    views = crop(torch.full((4000, 1, 28, 28), 100, dtype=torch.uint8), normalize=False)
    factor = views[0][:, 0, 0, 0] / (100 / 255)
    assert factor.min() >= 1 - s - 1e-4 and factor.max() <= 1 + s + 1e-4
    assert factor.min() < 1 - 0.95 * s and factor.max() > 1 + 0.95 * s
    assert 0.17 < (factor - 1).abs().lt(1e-6).float().mean() < 0.23  # p = 0.8 of being jittered


def test_rotation_turns_each_crop_by_its_own_angle_within_range() -> None:
    torch.manual_seed(0)
    image = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    image[..., 12:16, 2:26] = 255  # a horizontal bar through the centre
    crop = make(1, rotation=30.0, global_crop_scale=(1.0, 1.0), color_jitter=0.0, flip_prob=0.0,
                blur_prob=0.0, solarize_prob=0.0, local_crops=0)
    views = crop(image.expand(256, -1, -1, -1).contiguous(), normalize=False)[0][:, 0]
    ys, xs = torch.meshgrid(torch.arange(28.0) - 13.5, torch.arange(28.0) - 13.5, indexing="ij")
    w = views / views.sum((1, 2), keepdim=True)
    cov_xy, var_x = (w * xs * ys).sum((1, 2)), (w * xs * xs).sum((1, 2))
    var_y = (w * ys * ys).sum((1, 2))
    angle = torch.rad2deg(0.5 * torch.atan2(2 * cov_xy, var_x - var_y)).abs()  # the bar's tilt
    assert angle.max() < 32 and angle.max() > 25 and angle.std() > 5


def test_rgb_random_grayscale_hits_some_samples_only() -> None:
    torch.manual_seed(0)
    crop = make(3, color_jitter=1.0, blur_prob=0.0, solarize_prob=0.0)
    image = torch.tensor([200, 40, 90], dtype=torch.uint8).view(1, 3, 1, 1).expand(256, 3, 32, 32)
    view = crop(image.contiguous())[0]
    raw = view * torch.tensor(STD[3]).view(1, 3, 1, 1) + torch.tensor(MEAN[3]).view(1, 3, 1, 1)
    gray = (raw.amax(1) - raw.amin(1)).flatten(1).amax(1) < 1e-4
    assert 0.1 < gray.float().mean() < 0.35  # RandomGrayscale(0.2)


def test_colour_jitter_zero_keeps_colours() -> None:
    crop = make(3, color_jitter=0.0, blur_prob=0.0, solarize_prob=0.0)
    image = torch.tensor([200, 40, 90], dtype=torch.uint8).view(1, 3, 1, 1).expand(8, 3, 32, 32).contiguous()
    for view in crop(image):
        raw = view * torch.tensor(STD[3]).view(1, 3, 1, 1) + torch.tensor(MEAN[3]).view(1, 3, 1, 1)
        torch.testing.assert_close(raw * 255, image[:, :, : view.shape[2], : view.shape[3]].float())


@settings(max_examples=20, deadline=None)
@given(lo=st.floats(0.05, 0.9), width=st.floats(0.0, 0.1), size=st.sampled_from([16, 28, 64]))
def test_crop_boxes_inside_image_with_area_in_scale(lo: float, width: float, size: int) -> None:
    crop = make(1, global_crop_scale=(lo, lo + width))
    images = random_images(16, 1, size=size)
    boxes = crop.crop_boxes(images, (lo, lo + width))
    assert boxes[:, 0].tolist() == list(range(16))
    assert (boxes[:, 1:3] >= 0).all() and (boxes[:, 3:] <= size).all()
    area = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2]) / size**2
    assert (area <= lo + width + 0.1).all()  # integer rounding of the box sides


def test_full_box_resample_is_exact() -> None:
    from torchvision.ops import roi_align

    x = random_images(4, 3).float()
    boxes = torch.tensor([[i, 0, 0, 32, 32] for i in range(4)], dtype=torch.float32)
    torch.testing.assert_close(roi_align(x, boxes, 32, sampling_ratio=-1, aligned=True), x)


@pytest.mark.parametrize("channels", [1, 3])
def test_constant_image_is_normalised(channels: int) -> None:
    crop = make(channels, color_jitter=0.0, solarize_prob=0.0)
    views = crop(torch.full((2, channels, 32, 32), 100, dtype=torch.uint8))
    mean, std = torch.tensor(MEAN[channels]), torch.tensor(STD[channels])
    expected = ((100 / 255 - mean) / std).view(1, channels, 1, 1)
    for view in views:
        torch.testing.assert_close(view, expected.expand_as(view))


def test_only_second_global_view_is_solarised() -> None:
    crop = make(1, color_jitter=0.0, blur_prob=0.0, solarize_prob=1.0)
    views = crop(torch.full((2, 1, 32, 32), 200, dtype=torch.uint8))
    value = [(v * STD[1][0] + MEAN[1][0]) * 255 for v in views]
    torch.testing.assert_close(value[0], torch.full_like(value[0], 200.0))
    torch.testing.assert_close(value[1], torch.full_like(value[1], 55.0))
    torch.testing.assert_close(value[2], torch.full_like(value[2], 200.0))


@pytest.mark.parametrize("size", [28, 32])
def test_eval_transform(size: int) -> None:
    crop = make(3)
    images = random_images(4, 3, size=28)
    out = crop.eval_transform(images, size)
    assert out.shape == (4, 3, size, size) and out.dtype == torch.float32
    if size == 28:
        mean, std = torch.tensor(MEAN[3]).view(1, 3, 1, 1), torch.tensor(STD[3]).view(1, 3, 1, 1)
        torch.testing.assert_close(out, (images / 255 - mean) / std)


def test_eval_preprocess_resizes_the_shorter_side_crops_the_center_and_normalises() -> None:
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(0, 256, (2, 3, 40, 30), dtype=torch.uint8)
    pre = EvalPreprocess(24, 3, MEAN[3], STD[3])
    expected = TF.center_crop(TF.resize(images, [24], antialias=True), [24, 24]).float() / 255
    assert torch.equal(pre.pixels(images), expected)
    mean, std = torch.tensor(MEAN[3]).view(1, 3, 1, 1), torch.tensor(STD[3]).view(1, 3, 1, 1)
    torch.testing.assert_close(pre(images), (expected - mean) / std)
    torch.testing.assert_close(make(3).eval_transform(images, 24), pre(images))  # the one rule
    with pytest.raises(ValueError, match="mean and std"):
        EvalPreprocess(24, 3, MEAN[1], STD[1])


def test_rejects_bad_input() -> None:
    crop = make(1)
    with pytest.raises(ValueError, match="uint8"):
        crop(random_images(2, 3))
    with pytest.raises(ValueError, match="uint8"):
        crop.eval_transform(random_images(2, 1).float(), 28)
    with pytest.raises(ValueError, match="mean and std"):
        MultiCrop(crop_cfg(), 3, MEAN[1], STD[1])
