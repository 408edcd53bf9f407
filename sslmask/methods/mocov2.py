"""MoCo v2 (Chen et al., 2020): a query encoder, a momentum key encoder and a queue of keys.

InfoNCE of each query against its key and the queue's negatives, tau 0.2, momentum 0.999
(constant), an MLP projector 2048-2048-128 without BatchNorm, "aug+" views. Under DDP the
keys are computed with MoCo's shuffled BatchNorm (the global key batch is permuted across
processes, so no process normalises its own queries' keys together) and every process
enqueues the keys of all processes, in rank order, so the queue is the same everywhere. The
permutation comes from ``(train.seed, step)``: a resumed run shuffles as an uninterrupted one.

On one process there is no other process to shuffle with, and BatchNorm would normalise each key
with its own query's batch, the leak shuffled BN exists to stop. ``mocov2.shuffle_bn_batch``
emulates the reference's GPUs instead: the batch is split into groups of that size (MoCo's 32
images per GPU), queries run BatchNorm over their own group, keys over a group of the shuffled
batch, then the keys are put back in order: what the same global batch gives on
``B / shuffle_bn_batch`` processes (a test compares it with two real gloo processes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslmask import distributed as D
from sslmask.backbones import Backbone
from sslmask.heads import moco_mlp
from sslmask.losses import embedding_std, info_nce
from sslmask.methods.base import MomentumMethod
from sslmask.momentum import MomentumPairs, frozen_copy
from sslmask.progress import Progress
from sslmask.settings import RunSettings, Section, setting
from sslmask.transforms import ViewSpec, moco_v2_views


def shuffle_perm(n: int, seed: int, step: int, device: torch.device) -> torch.Tensor:
    """The same permutation of the global key batch on every process, from (seed, step)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return torch.randperm(n, generator=g).to(device)


@dataclass(frozen=True)
class MoCoV2Settings(Section):
    """``mocov2:`` (configs/mocov2.yaml has each value's source)."""

    section = "mocov2"
    queue: int = setting(ge=1)
    temperature: float = setting(gt=0)
    weak_key: bool = setting()
    shuffle_bn_batch: int = setting(ge=0)  # 0: off (one BatchNorm batch on one process)


def in_groups(fn, x: torch.Tensor, groups: int) -> torch.Tensor:
    """``fn`` over ``groups`` consecutive slices of ``x`` (each its own BatchNorm batch), joined."""
    return fn(x) if groups <= 1 else torch.cat([fn(part) for part in x.chunk(groups)])


class MoCoV2(MomentumMethod):
    name = "mocov2"
    sections = (MoCoV2Settings,)

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)
        m, c = settings.model, settings.section(MoCoV2Settings)
        self.mocov2 = c
        self.projector = moco_mlp(backbone.num_features, m.proj_hidden, m.proj_dim)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.ema = MomentumPairs((self.backbone, self.key_backbone), (self.projector, self.key_projector))
        queue = F.normalize(torch.randn(c.queue, m.proj_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None

    @classmethod
    def view_specs(cls, settings: RunSettings) -> list[ViewSpec]:
        """Query ("aug+") first, then the key (``mocov2.weak_key``: crop and flip only)."""
        data = settings.data
        return moco_v2_views(data.image_size, data.crop_min_scale, settings.section(MoCoV2Settings).weak_key)

    @classmethod
    def reference_decay_exclude(cls, settings: RunSettings) -> str:
        """MoCo's (and HCSC's) SGD decays every parameter (``SGD(model.parameters(), ...)``)."""
        return "none"

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projector]

    def bn_groups(self, batch: int) -> int:
        """How many emulated processes one process's batch stands for (1 under DDP, which
        shuffles across its real processes, or with the emulation off)."""
        size = self.mocov2.shuffle_bn_batch
        return max(1, batch // size) if size and D.world_size() == 1 else 1

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised queries, BatchNorm over each emulated process's own slice."""
        embed = lambda part: F.normalize(self.projector(self.backbone.pooled(part)).float(), dim=1)  # noqa: E731
        return in_groups(embed, x, self.bn_groups(x.shape[0]))

    @torch.no_grad()
    def keys(self, x: torch.Tensor, progress: Progress) -> torch.Tensor:
        """L2-normalised keys of this process's images, with shuffled BatchNorm under DDP (or
        emulated on one process)."""
        embed = lambda part: F.normalize(self.key_projector(self.key_backbone.pooled(part)).float(), dim=1)  # noqa: E731
        if D.world_size() == 1:
            groups = self.bn_groups(x.shape[0])
            if groups == 1:
                return embed(x)
            perm = shuffle_perm(x.shape[0], progress.seed, progress.step, x.device)
            keys = torch.empty(x.shape[0], self.queue.shape[1], device=x.device, dtype=self.queue.dtype)
            keys[perm] = in_groups(embed, x[perm], groups).to(keys.dtype)  # undo the shuffle
            return keys
        everything = D.all_gather(x)
        perm = shuffle_perm(everything.shape[0], progress.seed, progress.step, x.device)
        rank, n = D.rank(), x.shape[0]
        mine = everything[perm[rank * n : (rank + 1) * n]]
        shuffled = D.all_gather(
            F.normalize(self.key_projector(self.key_backbone.pooled(mine)).float(), dim=1)
        )
        keys = torch.empty_like(shuffled)
        keys[perm] = shuffled  # undo the shuffle
        return keys[rank * n : (rank + 1) * n]

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        q = self.query(batch["view0"])
        k = self.keys(batch["view1"], progress)
        loss = info_nce(q, k, self.queue, self.mocov2.temperature).mean()
        self._pending = k.detach()
        return {"loss": loss, "z_std": embedding_std(q)}

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys with ``keys`` (every process's, in rank order)."""
        size, ptr = self.queue.shape[0], int(self.queue_ptr)
        keys = keys[-size:]  # a batch larger than the queue keeps its newest keys
        idx = (ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + keys.shape[0]) % size)

    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        out = super().after_optimizer_step(progress)  # the EMA first, then the enqueue
        if self._pending is not None:
            self.enqueue(D.all_gather(self._pending))
            self._pending = None
        return out
