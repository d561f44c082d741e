"""DINO-style projection head ending in weight-normalised cluster prototypes."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from rayssl.objective import at_least_fp32


class ClusterHead(nn.Module):
    """MLP -> L2-normalise -> prototype layer, giving (N, num_clusters) logits.

    The MLP has `num_layers` linear layers (GELU between them, after a BatchNorm1d when
    `norm` is set, as DINO's `use_bn_in_head` for convnets), the last one projecting to
    `bottleneck_dim`. The prototypes are a bias-free,
    weight-normalised linear layer; with `norm_last_layer` their magnitude is
    fixed to 1, so the logits are cosine similarities in [-1, 1].
    """

    def __init__(
        self,
        in_dim: int,
        num_clusters: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        norm: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"model.head_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(c_in, c_out), *([nn.BatchNorm1d(c_out)] if norm else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers[:-2 if norm else -1])
        prototypes = nn.Linear(bottleneck_dim, num_clusters, bias=False)
        for module in [*self.mlp, prototypes]:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.prototypes = weight_norm(prototypes)
        magnitude = self.prototypes.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def prototype_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layer (magnitude and direction)."""
        return list(self.prototypes.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mlp(x)
        # the cosine logits are divided by temperatures as small as 0.02: bf16's 8-bit mantissa
        # would quantise them to ~0.1 logit, so the prototype layer always runs in float32 (or float64)
        with torch.autocast(z.device.type, enabled=False):
            return self.prototypes(F.normalize(at_least_fp32(z), dim=-1))
