"""HARL (Tran et al., 2022): BYOL plus foreground/background terms on mask-pooled features.

Per view: the last feature map h, the view's mask on h's grid m (``data.mask_mode``),
h_f = MAP(h, m), h_b = MAP(h, 1 - m), h_g = GAP(h); all three go through the shared
projector/predictor (online) or the target projector. Per sample and direction x -> x':

    L_mask = alpha L(p_f, z'_f) + (1 - alpha) L(p_b, z'_b)               (Eq. 1)
    L      = lambda L_mask + (1 - lambda) L(p_g, z'_g)   (hybrid, Eq. 4; mask-only: L_mask)

symmetrised over the two directions. alpha and lambda follow cosine ramps from their base
values to 1 (docs/methods.md §1). A sample whose mask is almost empty or almost full in either
view (foreground fraction outside [fallback_min, fallback_max]) uses the global BYOL term
alone (docs/methods.md §6); the fraction of such samples is logged as ``fallback``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslmask.backbones import Backbone
from sslmask.losses import embedding_std, harl_hybrid_loss, harl_mask_loss, regression_loss
from sslmask.methods.byol import BYOL
from sslmask.pooling import DOWNSAMPLE_MODES, POOL_NORMS, downsample_mask, masked_average_pool, usable_masks
from sslmask.progress import Progress
from sslmask.schedules import cosine_ramp
from sslmask.settings import FallbackBand, RunSettings, setting

LOSS_MODES = ("hybrid", "mask")
SCHEDULES = ("cosine", "fixed")


@dataclass(frozen=True)
class HARLSettings(FallbackBand):
    """``harl:`` (configs/harl.yaml has each value's source)."""

    section = "harl"
    loss: str = setting(choices=LOSS_MODES)
    alpha_base: float = setting(ge=0, le=1)
    alpha_schedule: str = setting(choices=SCHEDULES)
    lambda_base: float = setting(ge=0, le=1)
    lambda_schedule: str = setting(choices=SCHEDULES)
    mask_mode: str = setting(choices=DOWNSAMPLE_MODES)
    pool_norm: str = setting(choices=POOL_NORMS)


class HARL(BYOL):
    name = "harl"
    needs_masks = True
    sections = (HARLSettings,)

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        self.harl = settings.section(HARLSettings)

    def coefficients(self, step: int, total_steps: int) -> tuple[float, float]:
        h = self.harl
        alpha = cosine_ramp(h.alpha_base, step, total_steps) if h.alpha_schedule == "cosine" else h.alpha_base
        if h.loss == "mask":
            return alpha, 1.0
        lam = (
            cosine_ramp(h.lambda_base, step, total_steps) if h.lambda_schedule == "cosine" else h.lambda_base
        )
        return alpha, lam

    def _pool(
        self, backbone, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h_f, h_b on the feature grid; h_g the backbone's pooled feature (ResNet: GAP; ViT: CLS)."""
        cls, fmap = backbone.features(x) if backbone.is_vit else (None, backbone(x))
        m = downsample_mask(mask, fmap.shape[-2:], self.harl.mask_mode)
        norm = self.harl.pool_norm
        fg, bg = masked_average_pool(fmap, m, norm), masked_average_pool(fmap, 1 - m, norm)
        # a ResNet's GAP is taken after the masked pools: the order in which their gradients
        # add up on the grid then stays the one HARL's weights are pinned with
        return fg, bg, cls if cls is not None else fmap.mean(dim=(2, 3))

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        alpha, lam = self.coefficients(progress.step, progress.total_steps)
        online, target = [], []
        for v in range(2):
            x, mask = batch[f"view{v}"], batch[f"mask{v}"]
            pooled = self._pool(self.backbone, x, mask)
            online.append([self.online_predict(t) for t in pooled])  # [(p, z)] for fg, bg, global
            with torch.no_grad():
                target.append([self.target_project(t) for t in self._pool(self.target_backbone, x, mask)])
        ok = usable_masks([batch["mask0"], batch["mask1"]], self.harl.fallback_min, self.harl.fallback_max)
        total = fg_t = bg_t = glob_t = 0.0
        for a, b in ((0, 1), (1, 0)):
            (p_f, _), (p_b, _), (p_g, _) = online[a]
            z_f, z_b, z_g = target[b]
            mask_loss, fg, bg = harl_mask_loss(p_f, z_f, p_b, z_b, alpha)
            glob = regression_loss(p_g, z_g)
            per_sample = torch.where(ok, harl_hybrid_loss(mask_loss, glob, lam), glob)
            total = total + per_sample.mean()
            fg_t, bg_t, glob_t = (
                fg_t + fg.detach().mean(),
                bg_t + bg.detach().mean(),
                glob_t + glob.detach().mean(),
            )
        return {
            "loss": total,
            "loss_fg": fg_t,
            "loss_bg": bg_t,
            "loss_global": glob_t,
            "alpha": torch.tensor(alpha),
            "lambda": torch.tensor(lam),
            "fallback": 1 - ok.float().mean(),
            "z_std": embedding_std(online[0][2][1]),
        }
