"""Training methods by name. Adding one: a module here, an entry below, a config in configs/."""

from __future__ import annotations

from typing import Any

from sslmask.backbones import build_backbone
from sslmask.methods.base import SSLMethod
from sslmask.methods.byol import BYOL
from sslmask.methods.dino import DINO
from sslmask.methods.harl import HARL
from sslmask.methods.lodisc import LoDisc
from sslmask.methods.mocov2 import MoCoV2
from sslmask.methods.mocov3 import MoCoV3
from sslmask.methods.scfs import SCFS
from sslmask.methods.segas import SegAS

METHODS: dict[str, type[SSLMethod]] = {
    m.name: m for m in (BYOL, HARL, DINO, MoCoV2, MoCoV3, SCFS, LoDisc, SegAS)
}


def build_method(cfg: dict[str, Any]) -> SSLMethod:
    name = cfg["method"]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    backbone = build_backbone(cfg["model"]["arch"], cfg["model"]["out_stride"])
    return METHODS[name](backbone, cfg)
