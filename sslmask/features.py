"""Frozen-trunk features, the one extractor below the methods and the engine: the engine's
k-NN monitor, SegAS's re-clustering and every evaluation (``sslmask.eval``) embed through it.
Evaluation's loading of whole runs sits above the methods, in ``sslmask.eval.features``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from maskio.records import Records
from sslmask import distributed as D
from sslmask.backbones import Backbone, check_batch_memory, normalize
from sslmask.dataset import EvalDataset

# what a trunk embeds an image as: ``backbone``, its pooled feature (ResNet GAP, ViT CLS);
# ``gap``, the mean of its feature grid (a ViT's patch tokens); methods with a predictor
# add ``predictor`` (``SSLMethod.embed``)
TRUNK_EMBEDDINGS = ("backbone", "gap")


def trunk_embedding(trunk: Backbone, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that maps a normalised batch to ``trunk``'s ``kind`` embedding."""
    if kind == "backbone":
        return trunk.pooled
    if kind == "gap":
        return lambda x: trunk(x).mean(dim=(2, 3))
    raise ValueError(f"a trunk embeds as {' or '.join(TRUNK_EMBEDDINGS)}, not {kind!r}")


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    records: Records,
    image_size: int,
    batch_size: int = 128,
    workers: int = 2,
    device: torch.device | str = "cpu",
    embed: Callable[..., torch.Tensor] | None = None,
    masks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N x C float32 features, N labels)`` in record order; ``backbone`` (any module) runs in
    eval mode, and ``embed`` (default: ``backbone.pooled``) maps a normalised batch to features;
    with ``masks`` it is called as ``embed(x, m)``, m the centre-cropped masks in [0, 1]."""
    trunk = backbone if isinstance(backbone, Backbone) else getattr(backbone, "backbone", None)
    if isinstance(
        trunk, Backbone
    ):  # a method (embedding through its heads): its trunk's activations dominate
        check_batch_memory(trunk, image_size, batch_size)
    embed = embed or backbone.pooled
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(
        EvalDataset(records, image_size, masks), batch_size=batch_size, num_workers=workers, shuffle=False
    )
    feats, labels = [], []
    for images, y, *mask in loader:
        x = normalize(images.to(device, non_blocking=True))
        extra = [m.to(device).float() / 255 for m in mask]
        feats.append(embed(x, *extra).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def extract_features_sharded(
    backbone: Backbone,
    records: Records,
    image_size: int,
    info,
    embed: Callable[..., torch.Tensor] | None = None,
    workers: int = 0,
    masks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`extract_features` of all records on every rank, each rank embedding only its
    own slice (``info``: a ``sslmask.distributed.DistInfo``), so no rank waits on another's
    share. The result is in record order on every rank."""
    n = len(records)
    mine = np.arange(info.rank, n, info.world_size)
    feats, labels = extract_features(
        backbone,
        records.subset(mine),
        image_size,
        workers=workers,
        device=info.device,
        embed=embed,
        masks=masks,
    )
    feats = D.all_gather_uneven(feats.to(info.device), info).cpu()
    labels = D.all_gather_uneven(labels.to(info.device), info).cpu()
    order = np.concatenate([np.arange(r, n, info.world_size) for r in range(info.world_size)])
    back = np.argsort(order)
    return feats[back], labels[back]
