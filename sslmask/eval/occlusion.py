"""Occlusion robustness (SegAS's protocol, docs/methods.md §4.4 and §7.4): the top-1 of a linear
head trained on clean features, when part of each validation image is hidden.

- ``random``: ``round(r * G * G)`` random cells of a G x G grid (G = 7 ⟨A⟩) per image, for
  each ratio r; each image's cells come from a generator seeded by (seed, image index).
- ``attention``: the pixels where the backbone's own class-agnostic heatmap (channel mean of
  its last map, upsampled, min-max normalised) exceeds θ, for each θ.
- ``saliency``: the foreground (mask > 0.5) or the background of the split's maskgen masks.

Hidden pixels are zero in the normalised image, i.e. the dataset's mean colour ⟨A⟩ (as
SegAS's filtering and LoDisc's masking leave them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from maskio.records import Records
from sslmask.eval.knn import topk_accuracy
from sslmask.eval.linear import PROBES, fit_linear
from sslmask.features import extract_features
from sslmask.pooling import channel_heatmap

RATIOS = (0.25, 0.5, 0.75)
THETAS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

KeepFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


def random_grid_keep(
    indices: torch.Tensor, size: tuple[int, int], ratio: float, grid: int, seed: int
) -> torch.Tensor:
    """N x 1 x H x W: 0 on ``round(ratio * grid²)`` cells per image, drawn from (seed, index)."""
    n_cells = round(ratio * grid * grid)
    cells = torch.ones(len(indices), grid * grid)
    for row, index in enumerate(indices.tolist()):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
        cells[row, torch.randperm(grid * grid, generator=g)[:n_cells]] = 0
    return F.interpolate(cells.view(-1, 1, grid, grid), size=size, mode="nearest")


def attention_keep(heat: torch.Tensor, theta: float) -> torch.Tensor:
    """Hide {heat > theta}."""
    return (heat <= theta).float()


def saliency_keep(mask: torch.Tensor, part: str) -> torch.Tensor:
    """Hide the ``foreground`` (mask > 0.5) or the ``background``."""
    fg = (mask > 0.5).float()
    return 1 - fg if part == "foreground" else fg


def occluded_features(
    backbone, records: Records, image_size: int, keep_fn: KeepFn, masks: bool, loader: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the occluded centre crops (``keep_fn(x, mask, indices)``: weights;
    ``loader``: batch_size, workers, device)."""
    seen = [0]

    def embed(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        indices = torch.arange(seen[0], seen[0] + len(x))  # the loader keeps record order
        seen[0] += len(x)
        return backbone.pooled(x * keep_fn(x, mask, indices).to(x.device, x.dtype))

    return extract_features(backbone, records, image_size, embed=embed, masks=masks, **loader)


def conditions(
    backbone, ratios, thetas, grid: int, seed: int, saliency: bool
) -> dict[str, dict[str, tuple[KeepFn, bool]]]:
    """Every occlusion to run: family -> setting -> (keep function, whether it reads masks)."""

    def heat(x: torch.Tensor) -> torch.Tensor:
        return channel_heatmap(backbone(x), x.shape[-2:])

    out: dict[str, dict[str, tuple[KeepFn, bool]]] = {
        "random": {f"{r:g}": (lambda x, m, i, r=r: random_grid_keep(i, x.shape[-2:], r, grid, seed), False)
                   for r in ratios},
        "attention": {f"{t:g}": (lambda x, m, i, t=t: attention_keep(heat(x), t), False) for t in thetas},
    }  # fmt: skip
    if saliency:
        out["saliency"] = {part: (lambda x, m, i, part=part: saliency_keep(m, part), True)
                           for part in ("foreground", "background")}  # fmt: skip
    return out


@torch.no_grad()
def occlusion_eval(
    backbone,
    train: Records,
    val: Records,
    image_size: int,
    plan: dict[str, dict[str, tuple[KeepFn, bool]]],
    loader: dict,
    probe_schedule: str = "segas",
) -> dict:
    """Clean top-1 and top-1 under each occlusion of ``plan`` (see :func:`conditions`), all with
    one linear head fitted on the clean training features by ``probe_schedule`` (``PROBES``:
    SegAS's own by default). ``loader``: batch_size, workers, device."""
    ftr, ytr = extract_features(backbone, train, image_size, **loader)
    fva, yva = extract_features(backbone, val, image_size, **loader)
    with torch.enable_grad():
        probe = fit_linear(ftr, ytr, torch.unique(torch.cat([ytr, yva])), schedule=PROBES[probe_schedule])
    target = probe.index(yva)
    result: dict = {"clean": topk_accuracy(probe.logits(fva), target, (1,))["top1"]}
    for family, settings in plan.items():
        result[family] = {}
        for name, (keep_fn, masks) in settings.items():
            feats, _ = occluded_features(backbone, val, image_size, keep_fn, masks, loader)
            result[family][name] = topk_accuracy(probe.logits(feats), target, (1,))["top1"]
    return result
