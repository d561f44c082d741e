"""Multi-crop augmentation of uint8 image batches with torchvision.transforms.v2."""

from typing import Any

import torch
from torchvision.transforms import v2


def _blur(size: int, p: float) -> v2.Transform:
    """Gaussian blur with an odd kernel of about 10% of the crop size, applied with probability `p`."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


class MultiCrop:
    """DINO-style multi-crop: 2 global views plus `cfg.local_crops` local views per image.

    `cfg` needs `global_crop_size, global_crop_scale, local_crops, local_crop_size,
    local_crop_scale, flip_prob, color_jitter, blur_prob, solarize_prob`. Every
    image gets its own random parameters. Colour jitter of strength s applies
    brightness/contrast 0.4s (plus saturation 0.2s, hue 0.1s and 20% random
    grayscale for RGB) with p=0.8; s=0 disables all colour distortion, and
    single-channel images never get saturation, hue or grayscale ops. Global
    views are blurred with `blur_prob`, local views with `blur_prob / 2`; only
    the second global view is solarised (with `solarize_prob`).
    """

    def __init__(self, cfg: Any, channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if not len(mean) == len(std) == channels:
            raise ValueError(f"mean and std need {channels} values each, got {len(mean)} and {len(std)}")
        self.channels = channels

        def pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
            ops = [
                v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
                v2.RandomHorizontalFlip(cfg.flip_prob),
                *self._colour_ops(cfg.color_jitter),
                _blur(size, blur_p),
            ]
            if solarize_p > 0:
                ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
            return v2.Compose(ops)

        g = (cfg.global_crop_size, cfg.global_crop_scale)
        local = pipeline(cfg.local_crop_size, cfg.local_crop_scale, cfg.blur_prob / 2, 0.0)
        self.view_pipelines: list[v2.Compose] = [
            pipeline(*g, cfg.blur_prob, 0.0),
            pipeline(*g, cfg.blur_prob, cfg.solarize_prob),
            *[local] * cfg.local_crops,
        ]
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def _colour_ops(self, s: float) -> list[v2.Transform]:
        """Colour distortion of strength `s` (empty when s == 0)."""
        if s == 0:
            return []
        if self.channels == 1:
            return [v2.RandomApply([v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s)], p=0.8)]
        jitter = v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.2 * s, hue=0.1 * s)
        return [v2.RandomApply([jitter], p=0.8), v2.RandomGrayscale(0.2)]

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"expected uint8 images of shape (B, {self.channels}, H, W), got {images.dtype} {tuple(images.shape)}"
            )

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Views of a uint8 (B, C, H, W) batch: 2 global (B, C, g, g) then local (B, C, l, l), float32."""
        self._check(images)
        return [self.normalize(torch.stack([pipe(img) for img in images])) for pipe in self.view_pipelines]

    def eval_transform(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """Deterministic preprocessing for feature extraction: resize to `size` if needed, scale, normalise."""
        self._check(images)
        if images.shape[-2:] != (size, size):
            images = v2.functional.resize(images, [size, size], antialias=True)
        return self.normalize(images)
