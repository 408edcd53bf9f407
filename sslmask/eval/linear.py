"""Linear probe on frozen features (METHODS.md §7.1): a BN-free linear layer, SGD with
momentum 0.9, no weight decay, cosine learning rate, top-1/top-5 at the final epoch.

Features are extracted once from centre crops (no augmentation), then standardised with the
training set's mean and std. That affine map is fixed, so the probe is still one linear
layer on the raw features; it only makes one learning rate work across backbones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sslmask.eval.knn import compact_labels, topk_accuracy


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xva = (train_feats - mean) / std, (val_feats - mean) / std
    train_labels, val_labels, num_classes = compact_labels(train_labels, val_labels)
    head = nn.Linear(xtr.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(xtr), generator=g)
        for start in range(0, len(xtr), batch_size):
            idx = order[start : start + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = nn.functional.cross_entropy(head(xtr[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        result = topk_accuracy(head(xva), val_labels)
        result["train_top1"] = topk_accuracy(head(xtr), train_labels, (1,))["top1"]
    return result
