"""The method interface: a method owns its heads, losses and momentum encoders.

``forward(batch, step, total_steps)`` takes the normalised views (``view0``, ``view1`` ...)
and soft masks in [0, 1] (``mask0`` ...) on the device and returns a dict of named terms;
``"loss"`` is what the engine back-propagates, the other entries are logged. Schedules that
belong to the method (HARL's alpha and lambda) are computed from ``step / total_steps``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from sslmask.backbones import ResNetTrunk


class SSLMethod(nn.Module):
    name: ClassVar[str] = ""
    needs_masks: ClassVar[bool] = False
    num_views: ClassVar[int] = 2

    def __init__(self, backbone: ResNetTrunk, cfg: dict[str, Any]):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    def online_modules(self) -> list[nn.Module]:
        """The modules the optimiser updates."""
        raise NotImplementedError

    def momentum_update(self, tau: float) -> None:
        """Update momentum encoders (no-op for methods without one)."""

    def forward(self, batch: dict[str, torch.Tensor], step: int, total_steps: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError
