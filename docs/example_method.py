"""The training method of docs/adding-a-method.md, whole and runnable: tests/test_heads.py
imports it and trains it two steps, so the guide's code cannot drift from the API."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslmask.backbones import Backbone
from sslmask.heads import mlp
from sslmask.losses import moco_v3_loss
from sslmask.methods.base import MomentumMethod
from sslmask.momentum import MomentumPairs, frozen_copy
from sslmask.progress import Progress
from sslmask.settings import RunSettings, Section, setting


# --- the guide's example begins ---
@dataclass(frozen=True)
class MyMethodSettings(Section):  # the `mine:` section of the YAML, typed
    section = "mine"
    temperature: float = setting(gt=0)  # each check sits next to its field
    mode: str = setting(choices=("a", "b"))


class MyMethod(MomentumMethod):
    name = "mine"
    sections = (MyMethodSettings,)  # a subclass of another method adds to its parent's

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        self.mine = settings.section(MyMethodSettings)  # typed and checked when the YAML was loaded
        model = settings.model
        self.projector = mlp(backbone.num_features, model.proj_hidden, model.proj_dim, layers=2, last_bn=True)
        self.key_backbone, self.key_projector = frozen_copy(backbone), frozen_copy(self.projector)
        self.ema = MomentumPairs((self.backbone, self.key_backbone), (self.projector, self.key_projector))

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector]

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        q = self.projector(self.backbone.pooled(batch["view0"]))
        with torch.no_grad():
            k = self.key_projector(self.key_backbone.pooled(batch["view1"]))
        return {"loss": moco_v3_loss(q, k, self.mine.temperature)}


# --- the guide's example ends ---
