"""MoCo v3 (Chen, Xie and He, ICCV 2021): BYOL's architecture with a contrastive loss.

Query encoder = backbone + projector (3-layer MLP, BatchNorm, the last BN without affine) +
predictor (2-layer MLP); the momentum encoder has backbone and projector only, EMA with a
cosine rate from 0.99. Each query is contrasted with the keys of the whole global batch
(gathered from every process), symmetrised over the two views, scaled by ``2 tau``. Views:
BYOL's asymmetric pair.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslmask import distributed as D
from sslmask.backbones import Backbone
from sslmask.losses import embedding_std, moco_v3_loss
from sslmask.methods.base import SSLMethod
from sslmask.momentum import MomentumPairs, ema_rate, frozen_copy


def mlp(
    in_dim: int, hidden: int, out_dim: int, layers: int, last_bn: bool, dropout: float = 0.0
) -> nn.Sequential:
    """MoCo v3's MLP: (Linear-BN-ReLU[-Dropout]) x (layers - 1), Linear, and a BN without affine.

    ``dropout`` > 0 adds LoDisc's Dropout between the layers."""
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


class MoCoV3(SSLMethod):
    name = "mocov3"

    def __init__(self, backbone: Backbone, cfg: dict[str, Any]):
        super().__init__(backbone, cfg)
        m = cfg["model"]
        if cfg["mocov3"]["temperature"] <= 0:
            raise ValueError("mocov3.temperature must be > 0")
        p = self.head_dropout(cfg)
        self.projector = mlp(
            backbone.num_features, m["proj_hidden"], m["proj_dim"], 3, last_bn=True, dropout=p
        )
        self.predictor = mlp(m["proj_dim"], m["pred_hidden"], m["proj_dim"], 2, last_bn=False, dropout=p)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.ema = MomentumPairs((self.backbone, self.key_backbone), (self.projector, self.key_projector))

    @classmethod
    def head_dropout(cls, cfg: dict[str, Any]) -> float:
        """Dropout between the MLP layers (none in MoCo v3)."""
        return 0.0

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.predictor]

    def forward(self, batch: dict[str, torch.Tensor], step: int, total_steps: int) -> dict[str, torch.Tensor]:
        tau = self.cfg["mocov3"]["temperature"]
        q = [self.predictor(self.projector(self.backbone.pooled(batch[f"view{v}"]))) for v in range(2)]
        with torch.no_grad():
            k = [self.key_projector(self.key_backbone.pooled(batch[f"view{v}"])) for v in range(2)]
        offset = D.rank() * q[0].shape[0]
        loss = moco_v3_loss(q[0], D.all_gather(k[1]), tau, offset) + moco_v3_loss(
            q[1], D.all_gather(k[0]), tau, offset
        )
        return {"loss": loss, "z_std": embedding_std(q[0])}

    def after_optimizer_step(self, step: int, total_steps: int) -> dict[str, float]:
        tau = ema_rate(self.cfg, step, total_steps)
        self.ema.update(tau)
        return {"tau": tau}
