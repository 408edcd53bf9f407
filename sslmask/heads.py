"""Every method's projection and prediction heads, each in its reference's layout:

- :class:`MLPHead`, BYOL's and HARL's (Linear-BN-ReLU-Linear);
- :func:`moco_mlp`, MoCo v2's and SegAS's projector (Linear-ReLU-Linear, no BatchNorm);
- :func:`mlp`, MoCo v3's ``_build_mlp`` (and LoDisc's, with dropout);
- :class:`DINOHead`, DINO's and SCFS's (GELU MLP, L2 norm, weight-normalised prototypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class MLPHead(nn.Sequential):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


def moco_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's projector: Linear-ReLU-Linear (no BatchNorm)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def mlp(
    in_dim: int, hidden: int, out_dim: int, layers: int, last_bn: bool, dropout: float = 0.0
) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: (Linear-BN-ReLU[-Dropout]) x (layers - 1), Linear (no bias),
    and with ``last_bn`` a BatchNorm without affine.

    ``dropout`` > 0 adds LoDisc's Dropout after each hidden ReLU (its ``builder.py``)."""
    mods: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        if dropout > 0:
            mods.append(nn.Dropout(dropout))
        dim = hidden
    mods.append(nn.Linear(dim, out_dim, bias=False))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)


class DINOHead(nn.Module):
    """MLP (GELU, no BatchNorm) to a bottleneck, L2 normalisation, weight-normalised prototypes."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x).float(), dim=-1, p=2))
