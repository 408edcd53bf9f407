"""Frozen-backbone features: GAP of the last map on centre-cropped images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from sslmask.backbones import ResNetTrunk
from sslmask.dataset import EvalDataset, Records
from sslmask.transforms import normalize


@torch.no_grad()
def extract_features(
    backbone: ResNetTrunk,
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
        feats.append(backbone(x).mean(dim=(2, 3)).float().cpu())
        labels.append(y)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
