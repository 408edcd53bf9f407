"""SegAS (Bai et al., IJCAI 2024) on MoCo v2: hierarchical prototypes, calibrated prototype
targets and attention-shifting filtered views (docs/methods.md §4). No public code exists; the
prototype machinery follows HCSC (gyfastas/HCSC). Values the paper leaves open are ⟨A⟩ in
configs/segas.yaml.

Views: x^{q1} (MoCo v2 "aug+", ``view0``), the weak key x^k (``view1``) and a second aug+
view (``view2``) from which x^{q2} is made. Each epoch from ``segas.warmup_epochs`` on, the
momentum encoder embeds centre crops of every training image and faiss k-means clusters them
bottom-up into ``L`` levels (``before_epoch``); until then the loss is MoCo v2's alone. After:

- L_I: MoCo v2's InfoNCE of q1 against its key and the queue.
- Targets: per level, cosine similarities S of the key to the prototypes; calibration
  (Eqs. 6-9) sets S < mu to -1, p^k = softmax(S_re / tau_k), confidence
  rho = max p^k (1 - H(p^k) / log M), and the target is the sample's k-means label y when
  rho < tau_rho, else rho p^k + (1 - rho) y.
- HProCR^j: the mean over levels of KL(target || softmax(S(q_j, C) / tau_q)).
- x^{q2}: with probability rho^{q1} (the query's own confidence at level 1: easy samples are
  filtered more), view2 is filtered, by ApFS (GAIN's soft mask 1 - sigmoid(omega (A - sigma))
  on the momentum encoder's channel-mean last map A) or, with probability ½, by zeroing random
  grid cells of the same area; otherwise it stays as it is.
- L_diver: relu(p^{q2}(c) - p^{q1}(c) + margin) + q1 . q2 at level 1, c the target's argmax.
- L = L_I + alpha HProCR^1 + beta HProCR^2 + lambda L_diver.

Mask-aware SegAS (``segas.mask_mode: salient``, docs/methods.md §6) filters only object parts:
ApFS reads norm(A ⊙ m), random filtering picks cells inside the mask, and when less than
``guard_min`` of the foreground would remain the filtered area is halved. A sample whose
view2 mask covers < 1 % or > 99 % of it is filtered as in plain SegAS (logged ``fallback``).
``segas.cluster_on: foreground`` clusters foreground-pooled (MAP) embeddings instead, so the
prototypes are object-centric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from sslmask import distributed as D
from sslmask.backbones import Backbone
from sslmask.features import extract_features_sharded
from sslmask.losses import (
    calibrated_target,
    confidence,
    embedding_std,
    float32_products,
    info_nce,
    procr_loss,
)
from sslmask.methods.mocov2 import MoCoV2
from sslmask.pooling import (
    channel_heatmap,
    downsample_mask,
    masked_average_pool,
    normalise_per_image,
    usable_masks,
)
from sslmask.progress import Progress
from sslmask.prototypes import hierarchical_kmeans, prototype_sizes
from sslmask.settings import FallbackBand, RunSettings, setting
from sslmask.transforms import ViewSpec

if TYPE_CHECKING:
    from maskio.records import Records

MASK_MODES = ("none", "salient")
Q2_SOURCES = ("second_view", "q1")  # x^{q2} filtered from a second aug+ view ⟨A⟩, or from x^{q1} itself
MU_MODES = ("sample_max", "prototype_max", "mean", "max")  # max: sample_max's name in saved configs
DIVERSITY_ON = ("filtered", "all")
CLUSTER_ON = ("image", "foreground")


def apfs_keep(heat: torch.Tensor, omega: float, sigma: torch.Tensor | float) -> torch.Tensor:
    """Eq. 10: T(A) = 1 - sigmoid(omega (A - sigma)), the weight each pixel keeps."""
    return 1 - torch.sigmoid(omega * (heat - sigma))


def random_cells_keep(
    n_cells: torch.Tensor, allowed: torch.Tensor, size: tuple[int, int], g: torch.Generator
) -> torch.Tensor:
    """Random filtering: per image, zero ``n_cells`` random cells of the h x w grid among the
    ``allowed`` ones (B x h x w bool) -> B x 1 x H x W keep weights (0 or 1)."""
    b, h, w = allowed.shape
    scores = torch.rand(b, h * w, generator=g).to(allowed.device)
    scores = torch.where(allowed.view(b, -1), scores, torch.full_like(scores, 2.0))  # allowed first
    rank = scores.argsort(1).argsort(1)
    n = torch.minimum(n_cells, allowed.view(b, -1).sum(1))
    erased = (rank < n.view(-1, 1)).view(b, 1, h, w).float()
    return 1 - F.interpolate(erased, size=size, mode="nearest")


@dataclass(frozen=True)
class SegASSettings(FallbackBand):
    """``segas:`` (configs/segas.yaml has each value's source)."""

    section = "segas"
    warmup_epochs: int = setting(ge=0)
    prototypes: list[int] | None = setting(ge=1)  # per level, bottom-up; null: scaled to the data
    kmeans_iters: int = setting(ge=1)
    kmeans_redo: int = setting(ge=1)
    tau_key: float = setting(gt=0)
    tau_query: float = setting(gt=0)
    tau_rho: float = setting(ge=0, le=1)
    mu: str = setting(choices=MU_MODES)
    alpha: float = setting(ge=0)
    beta: float = setting(ge=0)
    lambda_diver: float = setting(ge=0)
    margin: float = setting(ge=0)
    diversity_on: str = setting(choices=DIVERSITY_ON)
    apfs_prob: float = setting(ge=0, le=1)
    omega: float = setting(gt=0)
    sigma: float = setting(gt=0, lt=1)
    random_grid: int = setting(ge=1)
    mask_mode: str = setting(choices=MASK_MODES)
    guard_min: float = setting(ge=0, lt=1)
    cluster_on: str = setting(choices=CLUSTER_ON)
    q2_from: str = setting(choices=Q2_SOURCES)

    def check(self) -> None:
        super().check()
        if self.prototypes == []:
            raise ValueError(
                "prototypes=[]: must be null (auto) or a list of cluster counts, bottom level first"
            )


class SegAS(MoCoV2):
    name = "segas"
    sections = (*MoCoV2.sections, SegASSettings)

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        self.segas = settings.section(SegASSettings)
        self.prototypes: list[torch.Tensor] = []  # per level, M_l x D (empty before clustering)
        self.instance_labels = torch.zeros(0, 0, dtype=torch.long)  # L x n
        self.clustered_epoch = -1

    @classmethod
    def view_specs(cls, settings: RunSettings) -> list[ViewSpec]:
        """x^{q1} (aug+), the key x^k and, with ``q2_from: second_view``, a second aug+ view that
        x^{q2} is filtered from (with ``q1``, x^{q2} is x^{q1} filtered: the same crop)."""
        query, key = MoCoV2.view_specs(settings)
        return [query, key] if settings.section(SegASSettings).q2_from == "q1" else [query, key, query]

    @classmethod
    def uses_masks(cls, settings: RunSettings) -> bool:
        s = settings.section(SegASSettings)
        return s.mask_mode != "none" or s.cluster_on == "foreground"

    # the prototypes live outside DDP's buffers (their shape is set by the data, and DDP would
    # broadcast n labels every step); they travel in the checkpoint as extra state
    @classmethod
    def check_data(cls, settings: RunSettings, n_images: int) -> None:
        """The prototype counts must fit the training set (checked again at each re-clustering)."""
        prototype_sizes(settings.section(SegASSettings).prototypes, n_images)

    def get_extra_state(self) -> dict[str, Any]:
        return {"epoch": self.clustered_epoch, "labels": self.instance_labels.cpu(),
                "prototypes": [c.cpu() for c in self.prototypes]}  # fmt: skip

    def set_extra_state(self, state: dict[str, Any]) -> None:
        device = self.queue.device
        self.clustered_epoch = int(state["epoch"])
        self.instance_labels = state["labels"].to(device)
        self.prototypes = [c.to(device) for c in state["prototypes"]]

    @torch.no_grad()
    def before_epoch(self, progress: Progress, records: Records, info: D.DistInfo) -> dict[str, float]:
        """Re-cluster the momentum encoder's embeddings of centre crops (rank 0 clusters; the
        result is broadcast). Leaves the global RNG as it found it."""
        epoch = progress.epoch
        if epoch < self.segas.warmup_epochs or self.clustered_epoch == epoch:
            return {}
        t0 = time.perf_counter()
        foreground = self.segas.cluster_on == "foreground"
        with torch.random.fork_rng(devices=[]):
            feats, _ = extract_features_sharded(
                self.key_backbone, records, self.settings.data.image_size, info,
                embed=self.embed_foreground if foreground else self.embed_keys, masks=foreground,
            )  # fmt: skip
        sizes = prototype_sizes(self.segas.prototypes, len(records))
        if info.main:
            cents, labels = hierarchical_kmeans(feats.numpy(), sizes, self.segas.kmeans_iters,
                                                self.segas.kmeans_redo, progress.seed + 1000 * epoch)  # fmt: skip
            cents = [torch.from_numpy(c) for c in cents]
            labels = torch.from_numpy(np.stack(labels))
        else:
            cents = [torch.empty(m, feats.shape[1]) for m in sizes]
            labels = torch.empty(len(sizes), len(records), dtype=torch.long)
        device = self.queue.device
        self.prototypes = [F.normalize(D.broadcast(c, info).float(), dim=1).to(device) for c in cents]
        self.instance_labels = D.broadcast(labels, info).to(device)
        self.clustered_epoch = epoch
        return {
            "cluster_s": time.perf_counter() - t0,
            **{f"clusters_l{i + 1}": m for i, m in enumerate(sizes)},
        }

    def embed_keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_backbone.pooled(x)).float(), dim=1)

    def embed_foreground(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The key of the foreground alone: MAP of the momentum encoder's last grid with the
        mask (GAP where the mask is empty), through the key projector."""
        grid = self.key_backbone(x)
        pooled = masked_average_pool(grid, downsample_mask(mask, grid.shape[-2:]))
        return F.normalize(self.key_projector(pooled).float(), dim=1)

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        q1 = self.query(batch["view0"])
        k = self.keys(batch["view1"], progress)
        loss_i = info_nce(q1, k, self.queue, self.mocov2.temperature).mean()
        self._pending = k.detach()
        out = {"loss_info": loss_i.detach(), "z_std": embedding_std(q1)}
        if not self.prototypes:
            return {"loss": loss_i, **out}
        s = self.segas
        labels = self.instance_labels[:, batch["index"]]
        targets = [calibrated_target(float32_products(k, c), y, s.tau_key, s.tau_rho, s.mu)
                   for c, y in zip(self.prototypes, labels, strict=True)]  # fmt: skip
        logits1 = [float32_products(q1, c) / s.tau_query for c in self.prototypes]
        x2, filtered, info = self.filtered_view(
            batch, torch.softmax(logits1[0].detach().float(), dim=1), progress
        )
        q2 = self.query(x2)
        logits2 = [float32_products(q2, c) / s.tau_query for c in self.prototypes]
        hprocr1 = torch.stack(
            [procr_loss(t, lg).mean() for t, lg in zip(targets, logits1, strict=True)]
        ).mean()
        hprocr2 = torch.stack(
            [procr_loss(t, lg).mean() for t, lg in zip(targets, logits2, strict=True)]
        ).mean()
        diver = self.diversity(targets[0], logits1[0], logits2[0], q1, q2, filtered)
        loss = loss_i + s.alpha * hprocr1 + s.beta * hprocr2 + s.lambda_diver * diver
        out.update(
            loss_hprocr1=hprocr1.detach(), loss_hprocr2=hprocr2.detach(), loss_diver=diver.detach(), **info
        )
        return {"loss": loss, **out}

    def diversity(self, target, logits1, logits2, q1, q2, filtered) -> torch.Tensor:
        """Eq. 12 at level 1, averaged over the filtered samples (``diversity_on: filtered``)
        or all of them."""
        c = target.argmax(1, keepdim=True)
        p1 = torch.softmax(logits1.float(), dim=1).gather(1, c)[:, 0]
        p2 = torch.softmax(logits2.float(), dim=1).gather(1, c)[:, 0]
        per_sample = F.relu(p2 - p1 + self.segas.margin) + (q1 * q2).sum(1)
        if self.segas.diversity_on == "all":
            return per_sample.mean()
        weight = filtered.to(per_sample.dtype)
        return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)

    @torch.no_grad()
    def filtered_view(
        self, batch: dict[str, torch.Tensor], p_q1: torch.Tensor, progress: Progress
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """x^{q2}, which samples were filtered, and what to log. The coins come from a generator
        seeded by (seed, step, rank), so a resumed run draws what an uninterrupted one did."""
        source = (
            0 if self.segas.q2_from == "q1" else 2
        )  # x^{q2} = ApFS(x^{q1}) on the same crop, or a 2nd view
        x = batch[f"view{source}"]
        b, size = x.shape[0], x.shape[-2:]
        g = torch.Generator().manual_seed((progress.seed * 1_000_003 + progress.step) * 257 + progress.rank)
        fire = torch.rand(b, generator=g).to(x.device) < confidence(p_q1)  # Eq. 11
        use_apfs = torch.rand(b, generator=g).to(x.device) < self.segas.apfs_prob
        grid = self.key_backbone(x)
        heat = channel_heatmap(grid, size)
        mask = batch.get(f"mask{source}")
        salient = torch.zeros(b, dtype=torch.bool, device=x.device)
        if self.segas.mask_mode == "salient":
            salient = usable_masks([mask], self.segas.fallback_min, self.segas.fallback_max)
            heat = torch.where(salient.view(-1, 1, 1, 1), normalise_per_image(heat * mask), heat)
        keep = self.filter_weights(heat, mask, salient, use_apfs, g)
        x2 = torch.where(fire.view(-1, 1, 1, 1), x * keep.to(x.dtype), x)
        info = {"filtered": fire.float().mean(), "apfs": (fire & use_apfs).float().mean(),
                "rho_q1": confidence(p_q1).mean()}  # fmt: skip
        if self.segas.mask_mode == "salient":
            info["fallback"] = 1 - salient.float().mean()
        return x2, fire, info

    def filter_weights(self, heat, mask, salient, use_apfs, g) -> torch.Tensor:
        """Per-pixel keep weights: ApFS, or random cells of a ``random_grid`` square grid
        covering the area of {A > sigma} (rounded to whole cells). For
        salient samples the random cells are drawn among those the mask touches and erase only
        its pixels, and the guard halves the area when less than ``guard_min`` of the
        foreground would remain."""
        b, grid_size = heat.shape[0], (self.segas.random_grid, self.segas.random_grid)
        sigma = torch.full((b, 1, 1, 1), self.segas.sigma, device=heat.device)
        area = (heat > self.segas.sigma).float().mean(dim=(1, 2, 3))
        n_cells = (area * grid_size[0] * grid_size[1]).round().long()
        allowed = torch.ones((b, *grid_size), dtype=torch.bool, device=heat.device)
        within = torch.ones_like(heat)  # what random filtering may erase
        if mask is not None:
            touched = F.adaptive_avg_pool2d(mask.float(), grid_size)[:, 0] > 0
            allowed = torch.where(salient.view(-1, 1, 1), touched, allowed)
            within = torch.where(salient.view(-1, 1, 1, 1), mask.float(), within)
        state = g.get_state()
        keep = self._keep(heat, sigma, n_cells, allowed, within, use_apfs, g)
        if mask is not None and self.segas.mask_mode == "salient":
            fg = mask.float().sum(dim=(1, 2, 3)).clamp_min(1e-6)
            remaining = (mask.float() * keep).sum(dim=(1, 2, 3)) / fg
            halve = salient & (remaining < self.segas.guard_min)
            if halve.any():  # sigma at the median heat above it halves the ApFS area
                above = torch.where(heat > sigma, heat, torch.full_like(heat, float("nan")))
                median = above.flatten(1).nanquantile(0.5, dim=1).nan_to_num(self.segas.sigma)
                sigma = torch.where(halve.view(-1, 1, 1, 1), median.view(-1, 1, 1, 1), sigma)
                n_cells = torch.where(halve, n_cells // 2, n_cells)
                g.set_state(state)  # the same random cells, fewer of them
                keep = self._keep(heat, sigma, n_cells, allowed, within, use_apfs, g)
        return keep

    def _keep(self, heat, sigma, n_cells, allowed, within, use_apfs, g) -> torch.Tensor:
        soft = apfs_keep(heat, self.segas.omega, sigma)
        hard = 1 - (1 - random_cells_keep(n_cells, allowed, heat.shape[-2:], g)) * within
        return torch.where(use_apfs.view(-1, 1, 1, 1), soft, hard)
