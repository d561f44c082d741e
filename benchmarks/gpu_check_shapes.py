"""The model and views of ``gpu_check.sh``'s step and objective checks, in one place: a bf16
ResNet-50 at 2 x 224 + 6 x 96 px, K = 65,536, batch 64 on the GPU; tiny shapes on the CPU with
``--dry-run`` (``GPU_CHECK_DRY=1``)."""

from __future__ import annotations

import os

import torch

from rayssl.config import Config, load_config


def setup(extra: list[str]) -> tuple[Config, torch.device, bool, list[torch.Tensor]]:
    """``(config, device, dry run?, random views)`` for the check, with ``extra`` overrides."""
    dry = os.environ["GPU_CHECK_DRY"] == "1"
    device = torch.device("cpu" if dry else "cuda")
    shape = (["model.backbone=convnet4", "train.batch_size=8", "objective.num_clusters=256"] if dry else
             ["model.backbone=resnet50", "model.small_stem=false", "train.batch_size=64",
              "augment.global_crop_size=224", "augment.local_crop_size=96", "augment.local_crops=6",
              "objective.num_clusters=65536"])
    cfg = load_config(f"{os.environ['ROOT']}/configs/fashion_mnist.yaml", [*shape, *extra])
    b, g, l = cfg.train.batch_size, cfg.augment.global_crop_size, cfg.augment.local_crop_size
    views = [torch.randn(b, 3, g, g, device=device) for _ in range(2)] + [
        torch.randn(b, 3, l, l, device=device) for _ in range(cfg.augment.local_crops)]
    return cfg, device, dry, views
