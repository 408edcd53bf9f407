"""The model and global batch shared by the DDP test and its torchrun workers."""

from __future__ import annotations

import torch

from sslmask.config import load_settings
from sslmask.methods import build_method


def make_method():
    cfg = load_settings(
        "harl", "cpu-demo", ["model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16"]
    )
    torch.manual_seed(0)
    return build_method(cfg)


def global_batch(n: int = 8, size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {}
    for v in range(2):
        batch[f"view{v}"] = torch.randn(n, 3, size, size, generator=g)
        mask = torch.zeros(n, 1, size, size)
        for i in range(n):
            top, left = int(torch.randint(0, 32, (), generator=g)), int(torch.randint(0, 32, (), generator=g))
            mask[i, :, top : top + 24, left : left + 28] = 1
        batch[f"mask{v}"] = mask
    return batch
