"""Training methods by name. Adding one: a module here, an entry below, a config in configs/."""

from __future__ import annotations

from sslmask.backbones import build_backbone, zero_init_residual
from sslmask.checkpoint import init_backbone
from sslmask.methods.base import SSLMethod
from sslmask.methods.byol import BYOL
from sslmask.methods.dino import DINO
from sslmask.methods.harl import HARL
from sslmask.methods.lodisc import LoDisc
from sslmask.methods.mocov2 import MoCoV2
from sslmask.methods.mocov3 import MoCoV3
from sslmask.methods.scfs import SCFS
from sslmask.methods.segas import SegAS
from sslmask.settings import RunSettings

METHODS: dict[str, type[SSLMethod]] = {
    m.name: m for m in (BYOL, HARL, DINO, MoCoV2, MoCoV3, SCFS, LoDisc, SegAS)
}


def build_method(settings: RunSettings, init: bool = False) -> SSLMethod:
    """The method ``settings`` names; with ``init``, its backbone starts from ``model.init`` when set.

    The weights are loaded before the method is built, so its momentum encoders start as
    copies of them too.
    """
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}; choose from {', '.join(METHODS)}")
    model = settings.model
    backbone = build_backbone(model.arch, model.out_stride)
    if METHODS[settings.method].zero_init_residual and not backbone.is_vit:
        zero_init_residual(backbone)
    if init and model.init:
        init_backbone(backbone, model.init, model.arch)
    return METHODS[settings.method](backbone, settings)
