"""What rank 0 gives MLflow after a run's last step (``Worker.mlflow``, a ``RunLogger``)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from rayssl.config import Config
from rayssl.data.meta import DataMeta
from rayssl.models import unwrap
from rayssl.tracking import RunLogger


def finish_tracking(mlflow: RunLogger, cfg: Config, meta: DataMeta, teacher: nn.Module, results: dict,
                    step: int) -> None:
    """The results, the training curves, the teacher's backbone (``tracking.log_model``), then the
    run's end."""
    mlflow.results(results, step)
    mlflow.curves(f"{cfg.objective.mode}, K={cfg.objective.num_clusters}, {cfg.model.backbone}")
    if mlflow.mlflow_run.log_model:
        # contiguous weights: torch.export warns on channels_last ones ("No complete tensor found")
        backbone = copy.deepcopy(unwrap(teacher).backbone).float().cpu().eval().to(
            memory_format=torch.contiguous_format)
        size = cfg.augment.global_crop_size
        example = np.random.default_rng(0).standard_normal((2, meta.channels, size, size)).astype(np.float32)
        mlflow.model(backbone, example, {"input": "normalised images (N, C, H, W); see preprocessing",
                                         "image_size": size, "channels": meta.channels,
                                         "mean": list(meta.mean), "std": list(meta.std)})
    mlflow.end()
