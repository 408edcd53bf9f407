"""The method interface: a method owns its views, heads, losses and momentum encoders.

``forward(batch, progress)`` takes the normalised views (``view0``, ``view1`` ...),
their soft masks in [0, 1] (``mask0`` ..., for methods with ``needs_masks``), crop boxes and
flips (``box0``, ``flip0`` ...) on the device and returns a dict of named terms; ``"loss"`` is
what the engine back-propagates, the other entries are logged. Every hook gets the engine's
``Progress`` (step, total steps, steps per epoch, seed, rank; ``sslmask.progress``) and reads
nothing of the loop's config. Everything that changes during training (EMA rate, teacher
temperature, HARL's alpha and lambda) is a function of the progress, so a checkpoint needs
only the step to restore it.

Hooks, in the order the engine calls them each step: ``forward``, backward,
``before_optimizer_step`` (e.g. DINO's frozen last layer), the optimiser step,
``after_optimizer_step`` (the EMA update; what it returns is logged). ``before_epoch`` runs
at the start of each epoch (not when a run resumes inside one; e.g. SegAS's re-clustering):
what a method changes there must be in its ``state_dict``, so a resume continues exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from sslmask.backbones import Backbone
from sslmask.features import TRUNK_EMBEDDINGS, trunk_embedding
from sslmask.momentum import MomentumPairs, ema_rate
from sslmask.optim import param_groups
from sslmask.progress import Progress
from sslmask.settings import RunSettings, Section
from sslmask.transforms import ViewSpec, byol_views

if TYPE_CHECKING:
    from maskio.records import Records
    from sslmask.distributed import DistInfo


class SSLMethod(nn.Module):
    name: ClassVar[str] = ""
    needs_masks: ClassVar[bool] = False
    # the trunk the method's reference code evaluates and exports: "online" (BYOL, MoCo) or
    # "momentum" (DINO's teacher); a run checkpoint records it (sslmask.checkpoint.BRANCHES)
    eval_branch: ClassVar[str] = "online"
    # what ``embed`` gives (``sslmask eval --features``); methods with a predictor add
    # "predictor" and define ``query``
    embeddings: ClassVar[tuple[str, ...]] = TRUNK_EMBEDDINGS
    # the method's own config sections (typed, checked when the config is loaded); a method
    # that extends another's config lists the parent's too
    sections: ClassVar[tuple[type[Section], ...]] = ()
    # whether the reference builds its ResNet with torchvision's zero_init_residual=True
    zero_init_residual: ClassVar[bool] = False

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__()
        self.backbone = backbone
        self.settings = settings

    @classmethod
    def view_specs(cls, settings: RunSettings) -> list[ViewSpec]:
        """The views each sample gives (default: BYOL's asymmetric pair)."""
        data = settings.data
        return list(byol_views(data.image_size, data.min_fg, data.crop_min_scale))

    @classmethod
    def uses_masks(cls, settings: RunSettings) -> bool:
        """Whether this run's method uses masks (a method with a mask-free mode overrides this)."""
        return cls.needs_masks

    @classmethod
    def reads_masks(cls, settings: RunSettings) -> bool:
        """Whether this run reads masks at all: for the method, or only to place its crops
        (``data.min_fg`` > 0, the mask-guided re-crop, which a mask-free twin such as BYOL can
        share with HARL so that the two differ only in how the method uses masks)."""
        return cls.uses_masks(settings) or settings.data.min_fg > 0

    @classmethod
    def reference_decay_exclude(cls, settings: RunSettings) -> str:
        """What ``optim.decay_exclude: auto`` means for this method: the parameters its reference
        code keeps out of weight decay (BYOL and DINO: biases and norms; see docs/methods.md)."""
        return "bias_norm"

    @classmethod
    def check_data(cls, settings: RunSettings, n_images: int) -> None:
        """Refuse (ValueError, one line) settings that cannot work on ``n_images`` training
        images, before the run starts rather than epochs later (SegAS's prototype counts)."""

    def online_modules(self) -> list[nn.Module]:
        """The modules the optimiser updates."""
        raise NotImplementedError

    def branch_backbone(self, branch: str) -> Backbone:
        """The ``online`` trunk (a method without momentum encoders has no other)."""
        if branch == "online":
            return self.backbone
        raise ValueError(f"{self.name} has no momentum encoder")

    def embed(self, x: torch.Tensor, kind: str = "backbone", branch: str = "online") -> torch.Tensor:
        """A normalised batch's ``kind`` embedding: the trunk's (``TRUNK_EMBEDDINGS``, of
        ``branch``) or, where the method has one, the online branch's ``predictor`` query."""
        if kind not in self.embeddings:
            raise ValueError(f"a {self.name} run embeds as {', '.join(self.embeddings)}, not {kind!r}")
        if kind == "predictor":
            return self.query(x)
        return trunk_embedding(self.branch_backbone(branch), kind)(x)

    def param_groups(self, weight_decay: float, exclude: str = "bias_norm") -> list[dict]:
        """Optimiser groups; ``exclude`` (``optim.decay_exclude``, resolved) names what gets no
        weight decay (and no LARS adaptation)."""
        return param_groups(self.online_modules(), weight_decay, exclude)

    def before_epoch(self, progress: Progress, records: Records, info: DistInfo) -> dict[str, float]:
        """At the start of ``progress.epoch``, on every rank: e.g. re-cluster; returns values to log."""
        return {}

    def before_optimizer_step(self, progress: Progress) -> None:
        """After backward, before the step: change gradients (e.g. freeze a layer)."""

    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        """After the step: update momentum encoders, queues, centres; returns values to log."""
        return {}

    def forward(self, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class MomentumMethod(SSLMethod):
    """A method with momentum (EMA) encoders: ``self.ema`` pairs each online module with its
    copy, and every optimiser step moves the copies at ``ema.tau_base``, constant or rising
    by cosine to 1 (``ema.schedule``), as BYOL, DINO and MoCo do (solo-learn's
    BaseMomentumMethod). A subclass adds what else follows the step (DINO's centre, MoCo v2's
    enqueue) after calling this."""

    ema: MomentumPairs

    def __init__(self, backbone: Backbone, settings: RunSettings):
        super().__init__(backbone, settings)

    def branch_backbone(self, branch: str) -> Backbone:
        """The ``online`` trunk or its ``momentum`` copy: the EMA partner of ``self.backbone``
        in ``self.ema`` (whatever the method names it: target, teacher, key)."""
        if branch == "online":
            return self.backbone
        for online, target in self.ema.pairs:
            if online is self.backbone:
                return target
        raise ValueError(f"{self.name} has no momentum copy of its backbone")

    @torch.no_grad()
    def after_optimizer_step(self, progress: Progress) -> dict[str, float]:
        tau = ema_rate(self.settings.ema, progress.step, progress.total_steps)
        self.ema.update(tau)
        return {"tau": tau}
