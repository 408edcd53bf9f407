"""Frozen-backbone features: GAP of the last map on centre-cropped images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from maskio.records import Records
from sslmask.backbones import Backbone, normalize
from sslmask.dataset import EvalDataset


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    records: Records,
    image_size: int,
    batch_size: int = 128,
    workers: int = 2,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N x C float32 features, N labels)`` in record order; the backbone runs in eval mode."""
    was_training = backbone.training
    backbone.eval()
    loader = DataLoader(
        EvalDataset(records, image_size), batch_size=batch_size, num_workers=workers, shuffle=False
    )
    feats, labels = [], []
    for images, y in loader:
        x = normalize(images.to(device, non_blocking=True))
        feats.append(backbone.pooled(x).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def labelled_features(
    checkpoint: str,
    arch: str | None,
    train_spec,
    val_spec,
    image_size: int,
    batch_size: int = 128,
    workers: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_feats, train_labels, val_feats, val_labels)`` from one frozen backbone.

    ``checkpoint`` is anything :func:`sslmask.checkpoint.load_backbone` takes; ``seed`` makes
    the ``random`` baseline reproducible. Both sets must be labelled.
    """
    from maskio.errors import ShardError
    from maskio.records import index_any
    from sslmask.checkpoint import load_backbone

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(checkpoint, arch).to(device)
    out: list[torch.Tensor] = []
    for spec in (train_spec, val_spec):
        records = index_any(list(spec))
        if not records.labelled:
            raise ShardError(f"{spec[0]}: some samples have no class label; evaluation needs labels")
        out.extend(extract_features(backbone, records, image_size, batch_size, workers, device))
    return out[0], out[1], out[2], out[3]
