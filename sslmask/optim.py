"""Optimisers: LARS (BYOL/SimCLR form), SGD and AdamW, and which parameters weight decay skips.

``optim.decay_exclude`` picks the rule, each one some reference's (docs/methods.md):
``bias_norm`` keeps biases and normalisation parameters (every tensor with fewer than 2
dimensions) out of weight decay and, under LARS, out of trust-ratio adaptation (BYOL, DINO,
MoCo v3's LARS); ``bias_norm_tokens`` also a ViT's position embedding and CLS token (timm's
``no_weight_decay()``); ``none`` decays everything (MoCo v2, HCSC, MoCo v3 and LoDisc on ViTs:
``SGD/AdamW(model.parameters(), weight_decay=...)``); ``auto`` is the method's reference rule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("lars", "sgd", "adamw")
DECAY_EXCLUDE = ("auto", "none", "bias_norm", "bias_norm_tokens")  # optim.decay_exclude (param_groups)
CLIP_MODES = ("global", "per_tensor")  # optim.clip_mode (clip_gradients)


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


def param_groups(modules: Iterable[nn.Module], weight_decay: float, exclude: str = "bias_norm") -> list[dict]:
    """Two groups: the decayed (and LARS-adapted) parameters and the rest (``exclude=True``, no
    decay), split by ``exclude`` (``none``, ``bias_norm``, ``bias_norm_tokens``: see above).
    Frozen parameters (``requires_grad=False``) are in neither."""
    if exclude not in DECAY_EXCLUDE[1:]:
        raise ValueError(f"optim.decay_exclude must be one of {', '.join(DECAY_EXCLUDE)}, got {exclude!r}")
    decay, rest = [], []
    for module in modules:
        skip = _no_decay_names(module) if exclude == "bias_norm_tokens" else set()
        for name, p in module.named_parameters():
            if p.requires_grad:
                kept_out = exclude != "none" and (p.ndim <= 1 or name in skip)
                (rest if kept_out else decay).append(p)
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


@torch.no_grad()
def clip_gradients(params: Iterable[torch.Tensor], max_norm: float, mode: str) -> None:
    """Clip gradients to ``max_norm``: ``global`` scales all of them by one factor so their
    joint norm is at most ``max_norm`` (``clip_grad_norm_``); ``per_tensor`` scales each
    tensor's gradient on its own, by ``max_norm / (norm + 1e-6)`` when that is below 1 (DINO's
    and SCFS's ``utils.clip_gradients``)."""
    grads = [p for p in params if p.grad is not None]
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(grads, max_norm)
        return
    if mode != "per_tensor":
        raise ValueError(f"optim.clip_mode must be one of {', '.join(CLIP_MODES)}, got {mode!r}")
    if not grads:
        return
    tensors = [p.grad for p in grads]
    norms = torch._foreach_norm(tensors)  # no host sync per tensor (DINO reads each norm back)
    for grad, norm in zip(tensors, norms, strict=True):
        grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))  # x 1.0 (no clip) is exact
