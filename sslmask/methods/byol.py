"""BYOL (Grill et al., 2020): online backbone + projector + predictor, EMA target."""

from __future__ import annotations

import torch
from torch import nn

from sslmask.backbones import Backbone
from sslmask.heads import MLPHead
from sslmask.losses import embedding_std, regression_loss
from sslmask.methods.base import MomentumMethod, SSLMethod
from sslmask.momentum import MomentumPairs, frozen_copy
from sslmask.progress import Progress
from sslmask.settings import RunSettings


class BYOL(MomentumMethod):
    name = "byol"
    embeddings = (*SSLMethod.embeddings, "predictor")

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        model = settings.model
        dim = backbone.num_features
        self.projector = MLPHead(dim, model.proj_hidden, model.proj_dim)
        self.predictor = MLPHead(model.proj_dim, model.pred_hidden, model.proj_dim)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)
        self.ema = MomentumPairs(
            (self.backbone, self.target_backbone), (self.projector, self.target_projector)
        )

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.predictor]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """predictor(projector(trunk(x))): the online branch's output (retrieval's ``predictor``)."""
        return self.online_predict(self.backbone.pooled(x))[0]

    def online_predict(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projector(pooled)
        return self.predictor(z), z

    @torch.no_grad()
    def target_project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.target_projector(pooled)

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        p, z_online, z_target = [], [], []
        for v in range(2):
            x = batch[f"view{v}"]
            pv, zv = self.online_predict(self.backbone.pooled(x))
            p.append(pv)
            z_online.append(zv)
            with torch.no_grad():
                z_target.append(self.target_project(self.target_backbone.pooled(x)))
        loss = (regression_loss(p[0], z_target[1]) + regression_loss(p[1], z_target[0])).mean()
        return {"loss": loss, "z_std": embedding_std(z_online[0])}
