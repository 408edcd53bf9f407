"""Projection and prediction heads (BYOL's MLP: Linear-BN-ReLU-Linear)."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
