"""Backbone networks mapping NCHW images to (N, D) feature vectors."""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer, resnet18, resnet50

from rayssl.names import BACKBONES

# name -> (hidden_dim, num_layers, num_heads, mlp_dim)
_VIT_CONFIGS = {
    "vit_tiny": (192, 12, 3, 768),
    "vit_small": (384, 12, 6, 1536),
}


def _convnet4(in_chans: int, width: int) -> tuple[nn.Module, int]:
    """Four Conv3x3-BN-ReLU blocks (width, 2w, 4w, 8w), max-pooling after the first three."""
    layers: list[nn.Module] = []
    channels = [in_chans, width, 2 * width, 4 * width, 8 * width]
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        if i < 3:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), channels[-1]


def _resnet(name: str, in_chans: int, small_stem: bool) -> tuple[nn.Module, int]:
    """Randomly initialised torchvision ResNet with an `in_chans` stem and no classifier.

    With `small_stem` the 7x7/2 stem conv becomes 3x3/1 and the stem max-pool is
    removed, which suits 28-32 px images.
    """
    model = resnet18(weights=None) if name == "resnet18" else resnet50(weights=None)
    if small_stem:
        model.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, dim


class ResolutionFreeViT(VisionTransformer):
    """torchvision ViT that accepts any input size by resampling its position embeddings.

    The patch-grid part of the learned position embedding is bicubically
    interpolated to the input's patch grid (the class-token embedding is kept
    as is); at the construction size the forward pass equals torchvision's.
    Returns the class token after the final LayerNorm.
    """

    def __init__(self, in_chans: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads = nn.Identity()
        p = self.patch_size
        self.conv_proj = nn.Conv2d(in_chans, self.hidden_dim, kernel_size=p, stride=p)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / (in_chans * p * p)))
        nn.init.zeros_(self.conv_proj.bias)

    def _pos_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding (1, 1 + grid_h * grid_w, hidden_dim) for a patch grid."""
        pos = self.encoder.pos_embedding
        side = self.image_size // self.patch_size
        if (grid_h, grid_w) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.conv_proj(x)  # (N, hidden, grid_h, grid_w)
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embedding(*patches.shape[-2:])
        enc = self.encoder
        return enc.ln(enc.layers(enc.dropout(tokens)))[:, 0]


def _vit(name: str, in_chans: int, image_size: int) -> tuple[nn.Module, int]:
    """ViT with patch 4 for images up to 64 px, patch 16 above."""
    hidden, layers, heads, mlp = _VIT_CONFIGS[name]
    patch = 4 if image_size <= 64 else 16
    model = ResolutionFreeViT(
        in_chans,
        image_size=max(patch, image_size // patch * patch),
        patch_size=patch,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        mlp_dim=mlp,
    )
    return model, hidden


def build_backbone(name: str, in_chans: int, image_size: int, small_stem: bool, width: int) -> tuple[nn.Module, int]:
    """Build backbone `name` for `in_chans`-channel images of about `image_size` pixels.

    Returns the module (NCHW float input, (N, D) output) and D. `small_stem`
    only affects ResNets; `width` (base channel count) only affects convnet4
    (64 gives ~1.5M parameters) and is ignored by ResNets and ViTs.
    """
    if name == "convnet4":
        return _convnet4(in_chans, width)
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_chans, small_stem)
    if name in _VIT_CONFIGS:
        return _vit(name, in_chans, image_size)
    raise ValueError(f"model.backbone: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
