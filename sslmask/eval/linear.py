"""Linear probe on frozen features (docs/methods.md §7.1): a BN-free linear layer, SGD with
momentum 0.9, no weight decay, cosine learning rate, top-1/top-5 at the final epoch.

Features are extracted once from centre crops (no augmentation), then standardised with the
training set's mean and std. That affine map is fixed, so the probe is still one linear
layer on the raw features; it only makes one learning rate work across backbones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sslmask.eval.knn import topk_accuracy


@dataclass
class LinearHead:
    """A fitted probe: standardisation, the linear layer, and the label of each output."""

    mean: torch.Tensor
    std: torch.Tensor
    layer: nn.Linear
    classes: torch.Tensor  # sorted label values; output c is classes[c]

    @torch.no_grad()
    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.layer((feats - self.mean) / self.std)

    def index(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label's output index (-1 for a label the probe has no output for)."""
        pos = torch.searchsorted(self.classes, labels).clamp_max(len(self.classes) - 1)
        return torch.where(self.classes[pos] == labels, pos, torch.full_like(pos, -1))

    def raw_weights(self) -> torch.Tensor:
        """The classes' weights on the raw (unstandardised) features: num_classes x C, what a
        class activation map sums the feature grid with (the bias and the mean only shift it)."""
        return self.layer.weight.detach() / self.std


@dataclass(frozen=True)
class ProbeSchedule:
    """How a probe is trained: ``milestones`` None is a cosine learning rate, else steps of
    ``gamma`` at those epochs; ``standardise`` fits on features scaled by the training set's
    mean and std (the same single linear layer on the raw features, one lr for every backbone)."""

    epochs: int = 100
    lr: float = 0.1
    milestones: tuple[int, ...] | None = None
    gamma: float = 0.1
    standardise: bool = True

    def lr_at(self, step: int, total: int, steps_per_epoch: int) -> float:
        if self.milestones is None:
            return self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        epoch = step // steps_per_epoch
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)


# the generic probe (docs/methods.md §7.1), and SegAS's for its occlusion table (§4.2: the FC
# layer 60 epochs at lr 5.0, the lr divided by 10 at epochs 30, 40 and 50 ⟨A: gamma 0.1⟩, on the
# backbone's raw pooled features)
PROBES = {
    "cosine": ProbeSchedule(),
    "segas": ProbeSchedule(epochs=60, lr=5.0, milestones=(30, 40, 50), gamma=0.1, standardise=False),
}


def fit_linear(
    feats: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor | None = None,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    schedule: ProbeSchedule | None = None,
) -> LinearHead:
    """SGD (momentum 0.9, no weight decay) on (standardised) features, by ``schedule`` (default:
    ``epochs`` of cosine lr from ``lr``, standardised); ``classes`` (default: the labels
    present) sets the outputs."""
    schedule = schedule or ProbeSchedule(epochs=epochs, lr=lr)
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels) if classes is None else classes
    if schedule.standardise:
        mean, std = feats.mean(0), feats.std(0) + 1e-6
    else:
        mean, std = torch.zeros(feats.shape[1]), torch.ones(feats.shape[1])
    x = (feats - mean) / std
    probe = LinearHead(mean, std, nn.Linear(x.shape[1], len(classes)), classes)
    y = probe.index(labels)
    with torch.no_grad():
        probe.layer.weight.normal_(0, 0.01, generator=g)
        probe.layer.bias.zero_()
    opt = torch.optim.SGD(probe.layer.parameters(), lr=schedule.lr, momentum=0.9, weight_decay=0.0)
    per_epoch = math.ceil(len(x) / batch_size)
    total = schedule.epochs * per_epoch
    step = 0
    for _ in range(schedule.epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(step, total, per_epoch)
            loss = nn.functional.cross_entropy(probe.layer(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return probe


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
    """Top-1/top-5 on the validation features and top-1 on the training ones, at the last epoch.
    The outputs cover the classes of both sets (a class missing from training counts as a miss)."""
    classes = torch.unique(torch.cat([train_labels, val_labels]))
    probe = fit_linear(train_feats, train_labels, classes, epochs, lr, batch_size, seed)
    result = topk_accuracy(probe.logits(val_feats), probe.index(val_labels))
    result["train_top1"] = topk_accuracy(probe.logits(train_feats), probe.index(train_labels), (1,))["top1"]
    return result
