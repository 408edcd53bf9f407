"""MoCo v3 (Chen, Xie and He, ICCV 2021): BYOL's architecture with a contrastive loss.

Query encoder = backbone + projector + predictor; the momentum encoder has backbone and
projector only, EMA with a cosine rate from 0.99. The heads are the official ``builder.py``'s
for the backbone (docs/methods.md "MoCo v3"): ResNet, a 2-layer projector and a 2-layer
predictor without the last BatchNorm (``MoCo_ResNet``); ViT, a 3-layer projector and a
2-layer predictor, both ending in BatchNorm1d(affine=False) (``MoCo_ViT``). On a ViT,
``mocov3.stop_grad_conv1`` freezes the patch embedding at its random initialisation, as the
ViT recipe's ``--stop-grad-conv1``. Each query is contrasted with the keys of the whole global
batch (gathered from every process), symmetrised over the two views, scaled by ``2 tau``.
Views: BYOL's asymmetric pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslmask import distributed as D
from sslmask.backbones import Backbone, as_vit
from sslmask.heads import mlp
from sslmask.losses import embedding_std, moco_v3_loss
from sslmask.methods.base import MomentumMethod, SSLMethod
from sslmask.momentum import MomentumPairs, frozen_copy
from sslmask.progress import Progress
from sslmask.settings import RunSettings, Section, setting
from sslmask.vit import VIT_ARCHS


def head_layout(vit: bool) -> dict[str, tuple[int, bool]]:
    """``{"projector": (layers, last_bn), "predictor": (layers, last_bn)}`` of the official
    ``MoCo_ViT`` / ``MoCo_ResNet``."""
    if vit:
        return {"projector": (3, True), "predictor": (2, True)}
    return {"projector": (2, True), "predictor": (2, False)}


@dataclass(frozen=True)
class MoCoV3Settings(Section):
    """``mocov3:`` (configs/mocov3.yaml has each value's source)."""

    section = "mocov3"
    stop_grad_conv1: bool = setting()
    temperature: float = setting(gt=0)


class MoCoV3(MomentumMethod):
    name = "mocov3"
    embeddings = (*SSLMethod.embeddings, "predictor")
    sections = (MoCoV3Settings,)
    zero_init_residual = True  # main_moco.py: torchvision_models.__dict__[arch](zero_init_residual=True)

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        self.mocov3 = settings.section(MoCoV3Settings)
        if backbone.is_vit and self.mocov3.stop_grad_conv1:
            for p in as_vit(
                backbone, "stop_grad_conv1"
            ).patch_embed.parameters():  # vits.py: patch_embed.proj
                p.requires_grad_(False)
        self.projector, self.predictor = self.build_heads(backbone, settings)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.ema = MomentumPairs((self.backbone, self.key_backbone), (self.projector, self.key_projector))

    @classmethod
    def build_heads(cls, backbone: Backbone, settings: RunSettings) -> tuple[nn.Module, nn.Module]:
        """(projector, predictor) in the official layout for ``backbone``."""
        m, p = settings.model, cls.head_dropout(settings)
        layout = head_layout(backbone.is_vit)
        layers, last_bn = layout["projector"]
        projector = mlp(backbone.num_features, m.proj_hidden, m.proj_dim, layers, last_bn, p)
        layers, last_bn = layout["predictor"]
        predictor = mlp(m.proj_dim, m.pred_hidden, m.proj_dim, layers, last_bn, p)
        return projector, predictor

    @classmethod
    def head_dropout(cls, settings: RunSettings) -> float:
        """Dropout between the MLP layers (none in MoCo v3)."""
        return 0.0

    @classmethod
    def reference_decay_exclude(cls, settings: RunSettings) -> str:
        """ResNet recipe: LARS, which neither decays nor adapts 1-D tensors; ViT recipe:
        ``AdamW(model.parameters(), weight_decay=0.1)``, every parameter decayed."""
        return "none" if settings.model.arch in VIT_ARCHS else "bias_norm"

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector, self.predictor]

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The query embedding q = predictor(projector(trunk(x))) (LoDisc retrieves with it)."""
        return self.predictor(self.projector(self.backbone.pooled(x)))

    @torch.no_grad()
    def key(self, x: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's key of x."""
        return self.key_projector(self.key_backbone.pooled(x))

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        tau = self.mocov3.temperature
        q = [self.query(batch[f"view{v}"]) for v in range(2)]
        k = [self.key(batch[f"view{v}"]) for v in range(2)]
        offset = D.rank() * q[0].shape[0]
        loss = moco_v3_loss(q[0], D.all_gather(k[1]), tau, offset) + moco_v3_loss(
            q[1], D.all_gather(k[0]), tau, offset
        )
        return {"loss": loss, "z_std": embedding_std(q[0])}
