"""SCFS (Song et al., ICCV 2023): DINO plus a semantic-consistent feature search per stage.

On each tapped stage i (ResNet: layers 2, 3, 4; ViT: ``scfs.vit_blocks`` ⟨A⟩) a search head
H_i (residual bottleneck, GAP, two FC layers, L2 norm; an EMA copy H'_i in the teacher)
compares a local crop with what the teacher sees of the same image at full view:

- the query q = GAP(F_l) of the student's map of local crop n, L2-normalised, no gradient;
- the attention A(x, y) = cos(q, F'_g(x, y)) over the teacher's map of global view g (no
  softmax, no ReLU);
- the teacher's target H'_i(A ⊙ F'_g), the student's H_i(F_l), compared by DINO's
  cross-entropy with the teacher temperature and no centring (as in the official code).

The per-stage loss is that local term averaged over crops (and globals, ``search_globals``),
plus, with ``layer_global_term`` (the code's default), a DINO term between the two global
views through the same heads with its own centre, the two halves averaged; the total is
DINO's loss plus the sum over stages (docs/methods.md §3).

Mask awareness (``scfs.mask_mode``, docs/methods.md §6), each mode adding to the previous one:
``key`` restricts the search to the foreground, A' = A ⊙ m_g (the global view's mask, area-
downsampled to the stage's grid); ``key_query`` pools the query with the local crop's own
mask (MAP); ``key_query_gate`` drops from the search loss a local crop whose foreground
fraction is under ``gate_min_fg`` ⟨A⟩. A sample whose mask is almost empty or almost full in
either global view uses plain SCFS; ``fallback`` and ``gated`` log how often.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslmask.backbones import Backbone
from sslmask.losses import dino_loss, search_loss
from sslmask.methods.dino import DINO, update_center
from sslmask.momentum import MomentumPairs, frozen_copy
from sslmask.pooling import DOWNSAMPLE_MODES, downsample_mask, masked_average_pool, usable_masks
from sslmask.progress import Progress
from sslmask.settings import FallbackBand, RunSettings, setting

MASK_MODES = ("none", "key", "key_query", "key_query_gate")
SEARCH_GLOBALS = ("first", "both")


class SearchHead(nn.Module):
    """H_i: residual bottleneck (1x1, 3x3, 1x1 convs with BN), GAP, FC-BN-ReLU-FC-BN, L2 norm."""

    def __init__(self, in_dim: int, bottleneck: int = 256, hidden: int = 2048, out_dim: int = 256):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_dim, bottleneck, 1, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck, bottleneck, 3, padding=1, bias=False),
            nn.BatchNorm2d(bottleneck),
            nn.ReLU(inplace=True),
            nn.Conv2d(bottleneck, in_dim, 1, bias=False),
            nn.BatchNorm2d(in_dim),
        )
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
            nn.BatchNorm1d(out_dim),
        )

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.block(grid) + grid)
        return F.normalize(self.mlp(x.mean(dim=(2, 3))).float(), dim=-1)


def search_query(grid: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The L2-normalised query of a local crop's map: GAP, or MAP with ``weights`` (N x 1 x h x w)."""
    pooled = grid.mean(dim=(2, 3)) if weights is None else masked_average_pool(grid, weights)
    return F.normalize(pooled.float(), dim=1)


def search_attention(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """A(x, y) = cos(q, F'(x, y)): N x C queries against N x C x h x w maps -> N x 1 x h x w."""
    return torch.einsum("nc,nchw->nhw", query, F.normalize(keys.float(), dim=1)).unsqueeze(1)


@dataclass(frozen=True)
class SCFSSettings(FallbackBand):
    """``scfs:`` (configs/scfs.yaml has each value's source)."""

    section = "scfs"
    layers: list[int] = setting(ge=1)
    vit_blocks: list[int] = setting(ge=1)
    head_bottleneck: int = setting(ge=1)
    head_hidden: int = setting(ge=1)
    head_dim: int = setting(ge=1)
    search_globals: str = setting(choices=SEARCH_GLOBALS)
    layer_global_term: bool = setting()
    mask_mode: str = setting(choices=MASK_MODES)
    mask_downsample: str = setting(choices=DOWNSAMPLE_MODES)
    gate_min_fg: float = setting(ge=0, lt=1)

    def check(self) -> None:
        super().check()
        for key in ("layers", "vit_blocks"):
            taps = getattr(self, key)
            if not taps or sorted(set(taps)) != taps:
                raise ValueError(f"{key}={taps}: the tapped stages must be increasing and distinct")


class SCFS(DINO):
    name = "scfs"
    sections = (*DINO.sections, SCFSSettings)

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        s = self.scfs = settings.section(SCFSSettings)
        if self.dino.local_crops < 1:
            raise ValueError("scfs: dino.local_crops must be >= 1 (the search runs from the local crops)")
        self.taps = list(s.vit_blocks if backbone.is_vit else s.layers)
        channels = backbone.stage_channels(self.taps)
        self.search_heads = nn.ModuleList(
            SearchHead(c, s.head_bottleneck, s.head_hidden, s.head_dim) for c in channels
        )
        self.teacher_search_heads = frozen_copy(self.search_heads)
        self.ema = MomentumPairs(
            (self.backbone, self.teacher_backbone),
            (self.head, self.teacher_head),
            (self.search_heads, self.teacher_search_heads),
        )
        self.register_buffer("layer_center", torch.zeros(len(self.taps), s.head_dim))
        self._batch_layer_center: torch.Tensor | None = None

    @classmethod
    def uses_masks(cls, settings: RunSettings) -> bool:
        return settings.section(SCFSSettings).mask_mode != "none"

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.head, self.search_heads]

    def _mask_plan(self, batch: dict[str, torch.Tensor], n_local: int) -> dict[str, torch.Tensor] | None:
        """Which samples use their masks (``use``, B) and which local crops stay in the search
        loss (``keep``, n_local x B); None in plain SCFS."""
        mode = self.scfs.mask_mode
        if mode == "none":
            return None
        use = usable_masks([batch["mask0"], batch["mask1"]], self.scfs.fallback_min, self.scfs.fallback_max)
        keep = torch.ones(n_local, use.shape[0], dtype=torch.bool, device=use.device)
        if mode == "key_query_gate":
            for n in range(n_local):
                small = batch[f"mask{2 + n}"].float().mean(dim=(1, 2, 3)) < self.scfs.gate_min_fg
                keep[n] = ~(use & small)
        return {"use": use, "keep": keep}

    def _weights(self, batch: dict[str, torch.Tensor], view: int, size, use: torch.Tensor) -> torch.Tensor:
        """View ``view``'s mask on a grid of ``size``; all ones for samples that fall back."""
        m = downsample_mask(batch[f"mask{view}"], size, self.scfs.mask_downsample)
        return torch.where(use.view(-1, 1, 1, 1), m, torch.ones_like(m))

    @torch.no_grad()
    def _search_inputs(self, local_grids: list[torch.Tensor], teacher_grids: list[torch.Tensor],
                       batch: dict[str, torch.Tensor], plan) -> torch.Tensor:  # fmt: skip
        """The teacher's augmented maps A ⊙ F'_g for every (global g, local n), g-major."""
        n_globals = 2 if self.scfs.search_globals == "both" else 1
        mode = self.scfs.mask_mode
        queries = []
        for n, grid in enumerate(local_grids):
            if mode in ("key_query", "key_query_gate"):
                w = self._weights(batch, 2 + n, grid.shape[-2:], plan["use"])
                q = torch.where(plan["use"].view(-1, 1), search_query(grid, w), search_query(grid))
            else:
                q = search_query(grid)
            queries.append(q)
        out = []
        for g in range(n_globals):
            key = teacher_grids[g].float()
            key_w = self._weights(batch, g, key.shape[-2:], plan["use"]) if plan is not None else None
            for q in queries:
                attn = search_attention(q, key)
                if key_w is not None:
                    attn = attn * key_w
                out.append(attn * key)
        return torch.cat(out).to(teacher_grids[0].dtype)

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        n_local = self.dino.local_crops
        crops = [batch[f"view{v}"] for v in range(2 + n_local)]
        plan = self._mask_plan(batch, n_local)
        pooled_g, grids_g = self.backbone.stage_features(torch.cat(crops[:2]), self.taps)
        pooled_l, grids_l = self.backbone.stage_features(torch.cat(crops[2:]), self.taps)
        student = [*self.head(pooled_g).chunk(2), *self.head(pooled_l).chunk(n_local)]
        temp = self.teacher_temp(progress)
        with torch.no_grad():
            t_pooled, t_grids = self.teacher_backbone.stage_features(torch.cat(crops[:2]), self.taps)
            teacher = self.teacher_head(t_pooled).chunk(2)
            targets = [F.softmax((t.float() - self.center) / temp, dim=-1) for t in teacher]
            self._batch_center = torch.cat(teacher).float().mean(0, keepdim=True)
        loss_dino = dino_loss(student, targets, self.dino.student_temp)
        terms = self._stage_terms(grids_g, grids_l, t_grids, batch, plan, temp)
        out = {"loss": loss_dino + terms.pop("loss_layers"), "loss_dino": loss_dino.detach(), **terms}
        out["teacher_temp"] = torch.tensor(temp)
        if plan is not None:
            out["fallback"] = 1 - plan["use"].float().mean()
            out["gated"] = 1 - plan["keep"].float().mean()
        return out

    def _stage_terms(self, grids_g, grids_l, t_grids, batch, plan, temp: float) -> dict[str, torch.Tensor]:
        """Σ_i of each stage's loss: the local search term and, optionally, the global term."""
        n_local = self.dino.local_crops
        n_globals = 2 if self.scfs.search_globals == "both" else 1
        tau_s = self.dino.student_temp
        keep = plan["keep"] if plan is not None else None
        weights = keep.float() if keep is not None else torch.ones(n_local, grids_l[0].shape[0] // n_local)
        weights = weights.reshape(-1).repeat(n_globals).to(grids_l[0].device)
        total = search_t = global_t = 0.0
        centers = []
        for i, (head, t_head) in enumerate(zip(self.search_heads, self.teacher_search_heads, strict=True)):
            s_local = head(grids_l[i])
            with torch.no_grad():
                t_local = t_head(self._search_inputs(list(grids_l[i].detach().chunk(n_local)),
                                                     list(t_grids[i].chunk(2)), batch, plan))  # fmt: skip
                target_local = F.softmax(t_local.float() / temp, dim=-1)
            local = search_loss(s_local.repeat(n_globals, 1), target_local, weights, tau_s)
            layer = local
            if self.scfs.layer_global_term:
                s_glob = head(grids_g[i]).chunk(2)
                with torch.no_grad():
                    t_glob = t_head(t_grids[i])
                    centers.append(t_glob.float().mean(0))
                    t_targets = [
                        F.softmax((t.float() - self.layer_center[i]) / temp, dim=-1) for t in t_glob.chunk(2)
                    ]
                glob = dino_loss(list(s_glob), t_targets, tau_s)
                layer = 0.5 * (glob + local)
                global_t = global_t + glob.detach()
            total = total + layer
            search_t = search_t + local.detach()
        self._batch_layer_center = torch.stack(centers) if centers else None
        return {"loss_layers": total, "loss_search": search_t, "loss_layer_global": torch.as_tensor(global_t)}

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        out = super().after_optimizer_step(progress)
        if self._batch_layer_center is not None:
            update_center(self.layer_center, self._batch_layer_center, self.dino.center_momentum)
            self._batch_layer_center = None
        return out
