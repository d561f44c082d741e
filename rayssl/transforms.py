"""Multi-crop augmentation of uint8 image batches, per-sample parameters, batched pixels.

Crop boxes come from torchvision v2's ``RandomResizedCrop`` sampler (one draw per image); the
pixels of all crops of a view are resampled in one ``torchvision.ops.roi_align`` call (bin
averaging, which antialiases downscaling), and flips, brightness/contrast/saturation jitter,
random grayscale and solarisation are per-sample masks and factors on the whole batch. Hue
is torchvision's HSV round trip and blur its Gaussian kernel, both applied to the whole batch
with per-sample factors (the blur as two 1-D passes, 2 k instead of k^2 multiply-adds per pixel:
at 224 px it was the largest share of a CPU multi-crop stage done image by image, docs/benchmarks.md [4/5]).
On a GPU the whole view is a handful of kernels; on a CPU it costs a fraction of a per-image
pipeline.

``EvalPreprocess`` is the one deterministic preprocessing of frozen features: the evaluator's,
the online k-NN's and the one ``rayssl.load_backbone`` publishes with a checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv  # adjust_hue's own (torchvision pinned)


CACHE_BYTES = 2**20  # float32 pixels per slice of a view on a CPU (about one core's L2)


@dataclass(frozen=True)
class _View:
    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float


def _uniform(n: int, lo: float, hi: float, device) -> Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


def _chance(n: int, p: float, device) -> Tensor:
    return torch.rand(n, device=device) < p


def _gray(x: Tensor) -> Tensor:
    """Luma (B, 1, H, W) of RGB or grayscale images in [0, 1]."""
    return TF.rgb_to_grayscale(x) if x.shape[1] == 3 else x


def _blur(x: Tensor, kernel: int, sigma: Tensor) -> Tensor:
    """Each image of (B, C, H, W) blurred with its own ``sigma``: ``TF.gaussian_blur(x[i],
    [kernel, kernel], [sigma[i]])`` (its kernel, reflect padding), as separable 1-D passes."""
    b, c, h, w = x.shape
    lim = (kernel - 1) / (2.0 * math.sqrt(2.0))
    t = torch.linspace(-lim, lim, kernel, dtype=x.dtype, device=x.device)
    k1 = torch.softmax(-(t / sigma.to(x.dtype).view(-1, 1)).pow(2), dim=1).repeat_interleave(c, 0)
    y = F.pad(x, [kernel // 2] * 4, mode="reflect").reshape(1, b * c, h + kernel - 1, w + kernel - 1)
    y = F.conv2d(y, k1.view(b * c, 1, 1, kernel), groups=b * c)
    return F.conv2d(y, k1.view(b * c, 1, kernel, 1), groups=b * c).view(b, c, h, w)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Each RGB image of (B, 3, H, W) in [0, 1] with its hue rotated by ``shift``: torchvision's
    ``adjust_hue`` (the same HSV round trip), per-sample factors."""
    h, s, v = _rgb_to_hsv(x).unbind(dim=-3)
    h = (h + shift.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Each image of (B, C, H, W) rotated about its centre by its own angle, bilinear, black fill."""
    rad = torch.deg2rad(degrees)
    cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _to_unit(images: Tensor) -> Tensor:
    """uint8 -> float32 in [0, 1], exactly ``images.float() / 255``."""
    return images.float() / 255


class EvalPreprocess(v2.Compose):
    """Deterministic preprocessing for features: a PIL image, a uint8 tensor (C, H, W) or a batch
    (B, C, H, W), on any device -> float32 (..., ``channels``, ``size``, ``size``).

    Grayscale or RGB to ``channels``, the shorter side resized to ``size`` (bilinear, antialiased,
    on uint8; a no-op at that size already), the centre ``size`` x ``size`` crop, scaled to [0, 1]
    and normalised with the dataset ``mean`` / ``std``. ``pixels`` stops before the normalisation.
    """

    def __init__(self, size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if not len(mean) == len(std) == channels:
            raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
        super().__init__([v2.ToImage(), v2.Grayscale(1) if channels == 1 else v2.RGB(),
                          v2.Resize(size, antialias=True), v2.CenterCrop(size), v2.Lambda(_to_unit),
                          v2.Normalize(list(mean), list(std))])
        self.size, self.channels = size, channels

    def pixels(self, images: Any) -> Tensor:
        """The resized, centre-cropped images in [0, 1], not normalised (the raw-pixel baseline)."""
        for transform in self.transforms[:-1]:
            images = transform(images)
        return images

    def normalize(self, pixels: Tensor) -> Tensor:
        """``pixels`` (from ``pixels``) normalised with the dataset mean and std."""
        return self.transforms[-1](pixels)


class MultiCrop:
    """DINO-style multi-crop: 2 global views, then ``cfg.local_crops`` local views per image.

    ``cfg`` needs ``global_crop_size, global_crop_scale, local_crops, local_crop_size,
    local_crop_scale, flip_prob, rotation, color_jitter, blur_prob, solarize_prob``. Every image
    gets its own random parameters. ``rotation`` (degrees) rotates each crop by an angle drawn
    uniformly from [-rotation, rotation], filling with black. Colour jitter of strength s
    (applied with p = 0.8) is torchvision's ``ColorJitter(brightness=s, contrast=s,
    saturation=s / 2, hue=s / 4)``: brightness and contrast factors uniform in [1 - s, 1 + s];
    RGB images also get saturation, hue and random grayscale (p = 0.2). s = 0.4 is DINO's
    ``ColorJitter(0.4, 0.4, 0.2, 0.1)``; single-channel images never get saturation, hue or
    grayscale ops. Global views are blurred
    with ``blur_prob``, local views with ``blur_prob / 2``; only the second global view is
    solarised (``solarize_prob``), as in DINO.
    """

    def __init__(self, cfg: Any, channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if not len(mean) == len(std) == channels:
            raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
        self.channels, self.flip_prob, self.jitter = channels, cfg.flip_prob, cfg.color_jitter
        self.rotation = cfg.rotation
        g = (cfg.global_crop_size, tuple(cfg.global_crop_scale))
        local = _View(cfg.local_crop_size, tuple(cfg.local_crop_scale), cfg.blur_prob / 2, 0.0)
        self.views = [_View(*g, cfg.blur_prob, 0.0), _View(*g, cfg.blur_prob, cfg.solarize_prob),
                      *[local] * cfg.local_crops]
        self._samplers = {v.scale: v2.RandomResizedCrop(v.size, scale=v.scale) for v in self.views}
        self.normalize = v2.Normalize(list(mean), list(std))
        self._eval: dict[int, EvalPreprocess] = {}  # by size, built on first use

    def _check(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"expected uint8 images of shape (B, {self.channels}, H, W), "
                             f"got {images.dtype} {tuple(images.shape)}")

    def crop_boxes(self, images: Tensor, scale: tuple[float, float]) -> Tensor:
        """One RandomResizedCrop box per image, as roi_align rows (index, x1, y1, x2, y2)."""
        sampler, probe = self._samplers[scale], [images[0]]
        rows = []
        for i in range(images.shape[0]):
            p = sampler.make_params(probe)
            rows.append((i, p["left"], p["top"], p["left"] + p["width"], p["top"] + p["height"]))
        return torch.tensor(rows, dtype=torch.float32, device=images.device)

    def _colour(self, x: Tensor) -> Tensor:
        n, s, dev = x.shape[0], self.jitter, x.device
        on = _chance(n, 0.8, dev)

        def factor(lo: float, hi: float) -> Tensor:  # 1 (no change) where the jitter is off
            return torch.where(on, _uniform(n, lo, hi, dev), 1.0).view(-1, 1, 1, 1)

        def blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:  # v2's _blend, per sample
            return (f * a + (1 - f) * b).clamp_(0, 1)

        x = factor(max(0.0, 1 - s), 1 + s) * x  # brightness: the blend with black
        x = x.clamp_(0, 1)
        x = blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor(max(0.0, 1 - s), 1 + s))
        if self.channels == 3:
            x = blend(x, _gray(x), factor(max(0.0, 1 - s / 2), 1 + s / 2))
            hue = _uniform(n, -s / 4, s / 4, dev).clamp(-0.5, 0.5)
            shift = torch.nonzero(on & (hue != 0)).flatten()
            if len(shift):
                x[shift] = _hue(x[shift], hue[shift])
            x = torch.where(_chance(n, 0.2, dev).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)
        return x

    def _view(self, x: Tensor, view: _View) -> Tensor:
        out = roi_align(x, self.crop_boxes(x, view.scale), view.size, sampling_ratio=-1, aligned=True)
        # On a CPU the per-pixel ops below run on slices of ~1 MiB, which stay in the core's cache
        # (the whole 224 px view of 64 images is 38 MiB: the HSV round trip alone took 3x longer).
        rows = out.shape[0] if out.is_cuda else max(1, CACHE_BYTES // (4 * out[0].numel()))
        for start in range(0, out.shape[0], rows):
            out[start:start + rows] = self._pixels(out[start:start + rows], view)
        return out

    def _pixels(self, out: Tensor, view: _View) -> Tensor:
        """Flip, rotation, colour, blur and solarisation of cropped views, each with its own draw."""
        n, dev = out.shape[0], out.device
        out = torch.where(_chance(n, self.flip_prob, dev).view(-1, 1, 1, 1), out.flip(-1), out)
        if self.rotation > 0:
            out = _rotate(out, _uniform(n, -self.rotation, self.rotation, dev))
        if self.jitter > 0:
            out = self._colour(out)
        if view.blur_prob > 0:
            kernel = max(3, int(0.1 * view.size) // 2 * 2 + 1)
            blur = torch.nonzero(_chance(n, view.blur_prob, dev)).flatten()
            if len(blur):
                out[blur] = _blur(out[blur], kernel, _uniform(len(blur), 0.1, 2.0, dev))
        if view.solarize_prob > 0:
            flip = _chance(n, view.solarize_prob, dev).view(-1, 1, 1, 1) & (out >= 0.5)
            out = torch.where(flip, 1 - out, out)
        return out

    def __call__(self, images: Tensor, normalize: bool = True) -> list[Tensor]:
        """Views of a uint8 (B, C, H, W) batch: 2 global (B, C, g, g), then local (B, C, l, l).

        Normalised with the dataset mean and std, or in [0, 1] with ``normalize=False``.
        """
        self._check(images)
        x = images.float() / 255
        views = [self._view(x, v) for v in self.views]
        return [self.normalize(v) for v in views] if normalize else views

    def eval_transform(self, images: Tensor, size: int) -> Tensor:
        """Deterministic preprocessing of a uint8 (B, C, H, W) batch for feature extraction:
        ``EvalPreprocess(size, ...)`` with this multi-crop's channels, mean and std."""
        self._check(images)
        if size not in self._eval:
            self._eval[size] = EvalPreprocess(size, self.channels, self.normalize.mean, self.normalize.std)
        return self._eval[size](images)
