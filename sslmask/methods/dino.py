"""DINO (Caron et al., ICCV 2021): self-distillation with no labels, multi-crop.

Student and EMA teacher share the architecture: backbone + DINO head (3-layer MLP with GELU,
an L2-normalised bottleneck, then a weight-normalised linear layer to ``dino.out_dim``
prototypes, its norm fixed at 1 and the layer frozen for ``dino.freeze_last_layer`` epochs).
The teacher sees the two global crops, the student every crop; the loss is the cross-entropy
of each student crop with each teacher crop but its own (``sslmask.losses.dino_loss``). The
teacher's output is centred (the centre an EMA, rate ``center_momentum``, of the batch mean
over every process) and sharpened by a temperature that warms up linearly from
``warmup_teacher_temp`` to ``teacher_temp``; here per step, where DINO steps it per epoch
(the same values at each epoch's start).
The teacher is what DINO evaluates and exports (``eval_branch``; docs/methods.md §0, §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sslmask import distributed as D
from sslmask.backbones import Backbone
from sslmask.heads import DINOHead
from sslmask.losses import dino_loss, embedding_std
from sslmask.methods.base import MomentumMethod
from sslmask.momentum import MomentumPairs, frozen_copy
from sslmask.progress import Progress
from sslmask.schedules import linear_warmup
from sslmask.settings import RunSettings, Section, setting
from sslmask.transforms import ViewSpec, multi_crop_views


@dataclass(frozen=True)
class DINOSettings(Section):
    """``dino:`` (configs/dino.yaml has each value's source)."""

    section = "dino"
    out_dim: int = setting(ge=1)
    norm_last_layer: bool = setting()
    freeze_last_layer: int = setting(ge=0)
    global_scale: list[float] = setting(gt=0, le=1)
    local_crops: int = setting(ge=0)
    local_size: int = setting(ge=8)
    local_scale: list[float] = setting(gt=0, le=1)
    student_temp: float = setting(gt=0)
    warmup_teacher_temp: float = setting(gt=0)
    teacher_temp: float = setting(gt=0)
    warmup_teacher_temp_epochs: int = setting(ge=0)
    center_momentum: float = setting(ge=0, le=1)

    def check(self) -> None:
        for key in ("global_scale", "local_scale"):
            scale = getattr(self, key)
            if len(scale) != 2 or scale[0] > scale[1]:
                raise ValueError(f"{key}={scale}: must be [low, high] with low <= high")


class DINO(MomentumMethod):
    name = "dino"
    eval_branch = "momentum"  # eval_knn.py / eval_linear.py read --checkpoint_key teacher
    sections = (DINOSettings,)

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        m, d = settings.model, settings.section(DINOSettings)
        self.dino = d
        self.head = DINOHead(backbone.num_features, m.proj_hidden, m.proj_dim, d.out_dim, d.norm_last_layer)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.ema = MomentumPairs((self.backbone, self.teacher_backbone), (self.head, self.teacher_head))
        self.register_buffer("center", torch.zeros(1, d.out_dim))
        self._batch_center: torch.Tensor | None = None

    @classmethod
    def view_specs(cls, settings: RunSettings) -> list[ViewSpec]:
        d = settings.section(DINOSettings)
        return multi_crop_views(settings.data.image_size, tuple(d.global_scale), d.local_crops,
                                d.local_size, tuple(d.local_scale))  # fmt: skip

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.head]

    def teacher_temp(self, progress: Progress) -> float:
        """DINO's ``np.linspace(warmup_teacher_temp, teacher_temp, W)`` indexed by epoch, which
        reaches ``teacher_temp`` at epoch W - 1, sampled per step: equal at every epoch start
        (a one-epoch warm-up keeps ``warmup_teacher_temp`` for that epoch, as linspace's one value)."""
        d, spe = self.dino, progress.steps_per_epoch
        if d.warmup_teacher_temp_epochs == 1:
            return d.warmup_teacher_temp if progress.step < spe else d.teacher_temp
        warmup = max(d.warmup_teacher_temp_epochs - 1, 0) * spe
        return linear_warmup(d.warmup_teacher_temp, d.teacher_temp, progress.step, warmup)

    def _embed(self, backbone: nn.Module, head: nn.Module, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """Crops of one size run as one batch (as DINO does); outputs per crop, in order."""
        out: list[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            y = head(backbone.pooled(torch.cat(crops[start:end])))
            out += list(y.chunk(end - start))
            start = end
        return out

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        n_views = 2 + self.dino.local_crops
        crops = [batch[f"view{v}"] for v in range(n_views)]
        student = self._embed(self.backbone, self.head, crops)
        with torch.no_grad():
            teacher = self._embed(self.teacher_backbone, self.teacher_head, crops[:2])
            temp = self.teacher_temp(progress)
            targets = [F.softmax((t.float() - self.center) / temp, dim=-1) for t in teacher]
            self._batch_center = torch.cat(teacher).float().mean(0, keepdim=True)
        loss = dino_loss(student, targets, self.dino.student_temp)
        return {"loss": loss, "teacher_temp": torch.tensor(temp), "z_std": embedding_std(student[0])}

    def before_optimizer_step(self, progress: Progress) -> None:
        """DINO keeps the prototypes still for the first ``freeze_last_layer`` epochs."""
        if progress.epoch < self.dino.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        out = super().after_optimizer_step(progress)  # the EMA first, then the centre
        if self._batch_center is not None:
            update_center(self.center, self._batch_center, self.dino.center_momentum)
            self._batch_center = None
        return out


@torch.no_grad()
def update_center(center: torch.Tensor, batch_center: torch.Tensor, momentum: float) -> None:
    """``center <- m center + (1 - m) mean over processes of batch_center`` (in place)."""
    if D.world_size() > 1:
        dist.all_reduce(batch_center)
        batch_center = batch_center / D.world_size()
    center.mul_(momentum).add_(batch_center, alpha=1 - momentum)
