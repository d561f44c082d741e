"""Training batches -> normalised multi-crop views (no Ray import)."""

from __future__ import annotations

import numpy as np
import torch

from rayssl.config import Config
from rayssl.data.images import Limits, decode_batch
from rayssl.data.meta import DataMeta
from rayssl.transforms import MultiCrop


class Views:
    """Training batches -> normalised multi-crop views, skipping (and counting) undecodable images.

    With ``data.decode_on=data`` the batch already holds uint8 views (``view_0``, ``view_1``,
    ... as (B, C, H, W)) from Ray Data; with ``worker`` it holds encoded images (``image``)
    that are decoded here and cropped on the device. ``ok`` marks the rows that decoded.
    """

    def __init__(self, cfg: Config, meta: DataMeta, device: torch.device) -> None:
        self.cfg, self.meta, self.device = cfg, meta, device
        self.crops = MultiCrop(cfg.augment, meta.channels, meta.mean, meta.std)
        self.limits = Limits.of(cfg.data)  # an image past them is skipped like an undecodable one
        self.skipped = 0

    def __call__(self, batch: dict) -> list[torch.Tensor] | None:
        """The views of the batch's decodable images, or None when none decoded."""
        if self.cfg.data.decode_on == "worker":
            images, ok = decode_batch(batch["image"], self.meta.channels, self.meta.image_size, self.limits)
        else:
            ok = batch["ok"]
        self.skipped += int((~ok).sum())
        if not ok.any():
            return None
        if self.cfg.data.decode_on == "worker":
            x = torch.from_numpy(images[ok]).permute(0, 3, 1, 2).to(self.device, non_blocking=True)
            return self.crops(x)
        keys = sorted((k for k in batch if k.startswith("view_")), key=lambda k: int(k[5:]))
        views = [torch.from_numpy(np.array(batch[k][ok])).to(self.device, non_blocking=True) for k in keys]
        return [self.crops.normalize(v.float() / 255) for v in views]
