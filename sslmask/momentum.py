"""Momentum (EMA) encoders: the frozen copies that BYOL, HARL, DINO and MoCo keep of their
online networks, and the one update they share."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

from sslmask.schedules import cosine_ramp
from sslmask.settings import EMASettings


def ema_rate(ema: EMASettings, step: int, total: int) -> float:
    """``ema.tau_base``, constant or cosine up to 1 (``ema.schedule``)."""
    return cosine_ramp(ema.tau_base, step, total) if ema.schedule == "cosine" else ema.tau_base


M = TypeVar("M", bound=nn.Module)


def frozen_copy(module: M) -> M:
    """A copy of ``module`` that no optimiser updates (its EMA target starts equal to it); of
    ``module``'s own type, so a trunk's copy is still a :class:`~sslmask.backbones.Backbone`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class MomentumPairs:
    """``(online, target)`` module pairs updated together: ``target = tau target + (1 - tau) online``.

    Parameters only; buffers (BatchNorm statistics) are the target's own, as in BYOL and MoCo.
    """

    def __init__(self, *pairs: tuple[nn.Module, nn.Module]):
        self.pairs = pairs

    @torch.no_grad()
    def update(self, tau: float) -> None:
        online = [p for a, _ in self.pairs for p in a.parameters()]
        target = [p for _, b in self.pairs for p in b.parameters()]
        torch._foreach_mul_(target, tau)
        torch._foreach_add_(target, online, alpha=1 - tau)
