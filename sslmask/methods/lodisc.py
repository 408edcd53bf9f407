"""LoDisc (Shi et al.): MoCo v3 on a ViT plus a local branch on location-wise masked views.

For each view x the momentum encoder (no gradient) gives the key k and, from the same pass,
every block's head-averaged self-attention. The blocks are fused by element-wise product
(computed as a sum of logs, so 12 layers of small probabilities do not underflow) and the CLS
row over the patches ranks them; the top (1 - r) N patches are kept and every other 16 x 16
patch is zeroed in the normalised image, which keeps its full resolution. The masked view
goes through the same momentum encoder: k_m. Then

    L = ctr(q1, k2) + ctr(q2, k1) + ctr(q1, k_m2) + ctr(q2, k_m1)

where ctr is MoCo v3's contrastive loss (in-batch negatives gathered across processes,
scaled by 2 tau). ``lodisc.heads`` picks the heads (docs/methods.md "LoDisc"): ``code``, what
produced the published numbers, has no projector (the official ``vits.py`` comments its
``self.heads`` call out), so k is the momentum encoder's raw CLS token and q = predictor(CLS),
a 2-layer MLP back to the CLS width; ``paper`` adds the MoCo v3 ViT projector the paper
describes, q = predictor(projector(CLS)) and k = projector'(CLS'). Both MLPs carry Dropout 0.2
after each hidden ReLU and end in BatchNorm1d(affine=False), as ``builder.py``'s. The momentum
encoder moves once per step (the official code moves it four times) and the masking is
batched on the device (the official code loops over pixels).

Mask-aware LoDisc (``lodisc.mode``, docs/methods.md §6): each patch's saliency s_j is the mean of
the maskgen mask over it. ``saliency`` ranks by s_j alone (ties: nearer the image centre
first) and runs no attention at all; ``product`` ranks the patches with s_j > ``salient_min``
by s_j^gamma A_j and fills the rest by attention rank. A sample whose mask covers under 1 % or
over 99 % of a view ranks that view by attention (plain LoDisc); ``fallback`` logs how often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslmask import distributed as D
from sslmask.backbones import Backbone, as_vit
from sslmask.heads import mlp
from sslmask.losses import embedding_std, moco_v3_loss
from sslmask.methods.mocov3 import MoCoV3, head_layout
from sslmask.momentum import ema_rate
from sslmask.pooling import usable_masks
from sslmask.progress import Progress
from sslmask.settings import FallbackBand, RunSettings, setting
from sslmask.vit import PATCH

MODES = ("attention", "saliency", "product")
HEADS = ("code", "paper")


def fused_attention(maps: list[torch.Tensor]) -> torch.Tensor:
    """log of the element-wise product over blocks of the CLS row over the patches: N x P."""
    logs = [m[:, 0, 1:].float().clamp_min(torch.finfo(torch.float32).tiny).log() for m in maps]
    return torch.stack(logs).sum(0)


def patch_saliency(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean of an N x 1 x H x W mask over each patch of the ViT's grid (padded like the image,
    on the right and bottom): N x P."""
    h, w = grid
    padded = F.pad(mask.float(), (0, w * PATCH - mask.shape[-1], 0, h * PATCH - mask.shape[-2]))
    return F.avg_pool2d(padded, PATCH).flatten(1)


def _centre_order(grid: tuple[int, int], device) -> torch.Tensor:
    """Patch indices from the grid's centre outwards (saliency mode's tie-break)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    dist = ((ys - (h - 1) / 2) ** 2 + (xs - (w - 1) / 2) ** 2).flatten()
    return torch.sort(dist, stable=True).indices


def select_patches(
    n_keep: int,
    grid: tuple[int, int],
    attention: torch.Tensor | None,
    saliency: torch.Tensor | None,
    mode: str,
    gamma: float = 1.0,
    salient_min: float = 0.5,
) -> torch.Tensor:
    """N x P bool: the ``n_keep`` patches each image keeps (docs/methods.md §5.1, §6)."""
    if mode == "attention":
        order = torch.sort(attention, dim=1, descending=True, stable=True).indices
    elif mode == "saliency":
        centre = _centre_order(grid, saliency.device).expand(saliency.shape[0], -1)
        by_saliency = torch.sort(saliency.gather(1, centre), dim=1, descending=True, stable=True).indices
        order = centre.gather(1, by_saliency)
    else:
        salient = saliency > salient_min
        value = torch.where(salient, gamma * saliency.clamp_min(1e-12).log() + attention, attention)
        by_value = torch.sort(value, dim=1, descending=True, stable=True).indices
        first = torch.sort(salient.gather(1, by_value).float(), dim=1, descending=True, stable=True).indices
        order = by_value.gather(1, first)
    keep = torch.zeros_like(order, dtype=torch.bool)
    return keep.scatter_(1, order[:, :n_keep], True)


def mask_patches(x: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Zero every dropped 16 x 16 patch of the normalised images ``x`` (N x 3 x H x W)."""
    h, w = grid
    pixels = keep.view(-1, 1, h, w).to(x.dtype).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    return x * pixels[..., : x.shape[-2], : x.shape[-1]]


@dataclass(frozen=True)
class LoDiscSettings(FallbackBand):
    """``lodisc:`` (configs/lodisc.yaml has each value's source)."""

    section = "lodisc"
    heads: str = setting(choices=HEADS)
    mask_ratio: float = setting(ge=0, lt=1)
    mode: str = setting(choices=MODES)
    gamma: float = setting(ge=0)
    salient_min: float = setting(ge=0, lt=1)
    mlp_dropout: float = setting(ge=0, lt=1)
    momentum_updates: int = setting(ge=1, le=16)


class LoDisc(MoCoV3):
    name = "lodisc"
    sections = (*MoCoV3.sections, LoDiscSettings)

    def __init__(self, backbone: Backbone, settings: RunSettings):
        if not backbone.is_vit:
            raise ValueError(f"lodisc needs a ViT backbone (model.arch vit_*), got {settings.model.arch!r}")
        super().__init__(backbone, settings)
        self.lodisc = settings.section(LoDiscSettings)

    @classmethod
    def uses_masks(cls, settings: RunSettings) -> bool:
        return settings.section(LoDiscSettings).mode != "attention"

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        """The reference moves its momentum encoder ``momentum_updates`` times a step (4), each
        time towards the same online weights: exactly one move at m ** 4."""
        m = ema_rate(self.settings.ema, progress.step, progress.total_steps)
        tau = m**self.lodisc.momentum_updates
        self.ema.update(tau)
        return {"tau": tau}

    @classmethod
    def build_heads(cls, backbone: Backbone, settings: RunSettings) -> tuple[nn.Module, nn.Module]:
        """``paper``: MoCo v3's ViT heads; ``code``: no projector, a predictor CLS -> CLS width."""
        if settings.section(LoDiscSettings).heads == "paper":
            return super().build_heads(backbone, settings)
        width = backbone.num_features
        layers, last_bn = head_layout(vit=True)["predictor"]
        predictor = mlp(width, settings.model.pred_hidden, width, layers, last_bn, cls.head_dropout(settings))
        return nn.Identity(), predictor

    @classmethod
    def head_dropout(cls, settings: RunSettings) -> float:
        return settings.section(LoDiscSettings).mlp_dropout

    @torch.no_grad()
    def _keys(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key of x, key of its masked view, which samples fell back to attention)."""
        grid = (-(-x.shape[-2] // PATCH), -(-x.shape[-1] // PATCH))
        n_keep = max(1, math.floor(grid[0] * grid[1] * (1 - self.lodisc.mask_ratio)))
        mode = self.lodisc.mode
        fallback = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        saliency = None
        if mode != "attention":
            fallback = ~usable_masks([mask], self.lodisc.fallback_min, self.lodisc.fallback_max)
            saliency = patch_saliency(mask, grid)
        attention = None
        if mode == "saliency" and not fallback.any():
            pooled = self.key_backbone.pooled(x)  # no attention extraction at all
        else:
            pooled, maps = as_vit(self.key_backbone, "lodisc").pooled_and_attention(x)
            attention = fused_attention(maps)
        keep = select_patches(
            n_keep, grid, attention, saliency, mode, self.lodisc.gamma, self.lodisc.salient_min
        )
        if mode != "attention" and fallback.any():
            plain = select_patches(n_keep, grid, attention, None, "attention")
            keep = torch.where(fallback.view(-1, 1), plain, keep)
        key = self.key_projector(pooled)  # nn.Identity with lodisc.heads=code: the raw CLS token
        masked = self.key_projector(self.key_backbone.pooled(mask_patches(x, keep, grid)))
        return key, masked, fallback

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        tau = self.mocov3.temperature
        q = [self.query(batch[f"view{v}"]) for v in range(2)]
        keys = [self._keys(batch[f"view{v}"], batch.get(f"mask{v}")) for v in range(2)]
        offset = D.rank() * q[0].shape[0]
        k = [D.all_gather(key) for key, _, _ in keys]
        k_m = [D.all_gather(masked) for _, masked, _ in keys]
        glob = moco_v3_loss(q[0], k[1], tau, offset) + moco_v3_loss(q[1], k[0], tau, offset)
        local = moco_v3_loss(q[0], k_m[1], tau, offset) + moco_v3_loss(q[1], k_m[0], tau, offset)
        out = {"loss": glob + local, "loss_global": glob.detach(), "loss_local": local.detach()}
        if self.lodisc.mode != "attention":
            out["fallback"] = torch.cat([f for _, _, f in keys]).float().mean()
        out["z_std"] = embedding_std(q[0])
        return out
