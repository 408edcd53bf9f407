"""Optimisers: LARS (BYOL/SimCLR form), SGD and AdamW, with biases and norms kept apart.

Biases, normalisation parameters (every tensor with fewer than 2 dimensions) and a ViT's
position embedding and CLS token get no weight decay and, under LARS, no trust-ratio adaptation (BYOL, HARL §4.1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ``eta * |w| / |g + wd w|``.

    Groups with ``exclude=True`` use plain momentum SGD without weight decay.
    """

    def __init__(
        self, params, lr: float, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001
    ):
        super().__init__(
            params,
            {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta, "exclude": False},
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if not group["exclude"]:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.norm(p), torch.norm(d_p)
                    trust = torch.where(
                        (p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, torch.ones_like(p_norm)
                    )
                    d_p = d_p.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _no_decay_names(module: nn.Module) -> set[str]:
    """Parameters a module asks to keep out of weight decay (timm's ``no_weight_decay()``: a
    ViT's position embedding and CLS token), by their full name inside ``module``."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        ask = getattr(sub, "no_weight_decay", None)
        if callable(ask):
            names |= {f"{prefix}.{n}" if prefix else n for n in ask()}
    return names


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, adapted) and biases, norms and tokens (``exclude=True``,
    no decay): every tensor with fewer than 2 dimensions, and what a module lists in its
    ``no_weight_decay()``."""
    decay, rest = [], []
    for module in modules:
        skip = _no_decay_names(module)
        for name, p in module.named_parameters():
            if p.requires_grad:
                (rest if p.ndim <= 1 or name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "exclude": False},
        {"params": rest, "weight_decay": 0.0, "exclude": True},
    ]


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``groups`` from :func:`param_groups` (or a method's own); each names its weight decay."""
    groups = [dict(g) for g in groups]
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    for g in groups:
        g.pop("exclude")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
