"""Encoders (backbone + cluster head), teacher construction and EMA updates."""

import copy
from itertools import groupby
from typing import Any

import torch
from torch import nn

from rayssl.models.backbones import BACKBONES, build_backbone
from rayssl.models.head import ClusterHead

__all__ = ["BACKBONES", "ClusterHead", "Encoder", "build_backbone", "build_encoder", "ema_update",
           "initial_encoder", "make_teacher", "unwrap"]


class Encoder(nn.Module):
    """Backbone followed by a cluster head, applied to a list of multi-crop views."""

    def __init__(self, backbone: nn.Module, head: ClusterHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, D) of a batch of images."""
        return self.backbone(x)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Logits (V, B, K) for V views of B images each.

        Consecutive views of the same spatial size share one backbone pass;
        the head then runs once on all features.
        """
        feats = [
            self.backbone(torch.cat(list(group)))
            for _, group in groupby(views, key=lambda v: v.shape[-2:])
        ]
        logits = self.head(torch.cat(feats))
        return logits.reshape(len(views), views[0].shape[0], -1)


def build_encoder(model_cfg: Any, in_chans: int, image_size: int, num_clusters: int) -> Encoder:
    """Encoder from a config with `backbone, small_stem, width, head_hidden_dim, head_bottleneck_dim, head_layers, head_norm`."""
    backbone, dim = build_backbone(model_cfg.backbone, in_chans, image_size, model_cfg.small_stem, model_cfg.width)
    head = ClusterHead(
        dim,
        num_clusters,
        hidden_dim=model_cfg.head_hidden_dim,
        bottleneck_dim=model_cfg.head_bottleneck_dim,
        num_layers=model_cfg.head_layers,
        norm=model_cfg.head_norm,
    )
    return Encoder(backbone, head)


def initial_encoder(cfg: Any, channels: int) -> Encoder:
    """The encoder at training's initialisation, for ``channels``-channel images: the global torch
    seed set to ``cfg.train.seed`` (the same weights on every worker), then ``cfg.model`` built at
    ``cfg.augment.global_crop_size`` px with ``cfg.objective.num_clusters`` clusters. Training and
    ``rayssl.eval.backbone`` both build through it; the random state is left as building left it."""
    torch.manual_seed(cfg.train.seed)
    return build_encoder(cfg.model, channels, cfg.augment.global_crop_size, cfg.objective.num_clusters)


def unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of a DistributedDataParallel (or similar) wrapper, else `model`."""
    return getattr(model, "module", model)


def make_teacher(student: nn.Module) -> Encoder:
    """Independent deep copy of `student` (unwrapped from DDP) with all gradients disabled."""
    teacher = copy.deepcopy(unwrap(student))
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: teacher_param = momentum * teacher_param + (1 - momentum) * student_param.

    Only parameters are averaged; buffers such as BatchNorm running statistics
    stay the teacher's own. Either model may be wrapped in DistributedDataParallel.
    """
    t_params = list(unwrap(teacher).parameters())
    s_params = list(unwrap(student).parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters but student has {len(s_params)}")
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
