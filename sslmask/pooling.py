"""Masks on the feature grid and masked average pooling (docs/methods.md §0).

The official HARL codes disagree on both steps, so every variant is selectable:

- ``downsample_mask`` modes: ``soft_area`` (spec default: foreground fraction of each cell),
  ``bilinear`` (TF code: bilinear resize, soft), ``hard_any`` (PyTorch code: antialiased
  bilinear resize, then > 0), ``hard_majority`` (fraction > 0.5).
- ``masked_average_pool`` norms: ``mask_sum`` (spec: sum m F / (sum m + eps)), ``grid_size``
  (TF: divide by h*w), ``mask_sum_plus_one`` (PyTorch: sum m F / (sum m + 1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DOWNSAMPLE_MODES = ("soft_area", "bilinear", "hard_any", "hard_majority")
POOL_NORMS = ("mask_sum", "grid_size", "mask_sum_plus_one")


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], mode: str = "soft_area") -> torch.Tensor:
    """N x 1 x H x W mask in [0, 1] -> N x 1 x h x w foreground weights."""
    mask = mask.float()
    if mode == "soft_area":
        return F.adaptive_avg_pool2d(mask, size)
    if mode == "bilinear":
        return F.interpolate(mask, size=size, mode="bilinear", align_corners=False, antialias=False).clamp(
            0, 1
        )
    if mode == "hard_any":
        soft = F.interpolate(mask, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (soft > 1e-6).float()
    if mode == "hard_majority":
        return (F.adaptive_avg_pool2d(mask, size) > 0.5).float()
    raise ValueError(f"unknown mask downsampling mode {mode!r}; choose from {', '.join(DOWNSAMPLE_MODES)}")


def masked_average_pool(
    features: torch.Tensor,
    weights: torch.Tensor,
    norm: str = "mask_sum",
    eps: float = 1e-6,
    min_mass: float = 1e-3,
) -> torch.Tensor:
    """MAP(F, m): N x C x h x w features, N x 1 x h x w weights -> N x C.

    With ``mask_sum`` a sample whose mask mass is below ``min_mass`` (in cells) falls back
    to plain global average pooling instead of dividing (almost) zero by (almost) zero.
    """
    weights = weights.to(features.dtype)
    summed = (features * weights).sum(dim=(2, 3))
    mass = weights.sum(dim=(2, 3))
    if norm == "mask_sum":
        pooled = summed / (mass + eps)
        gap = features.mean(dim=(2, 3))
        return torch.where(mass >= min_mass, pooled, gap)
    if norm == "grid_size":
        return summed / (features.shape[2] * features.shape[3])
    if norm == "mask_sum_plus_one":
        return summed / (mass + 1.0)
    raise ValueError(f"unknown pooling norm {norm!r}; choose from {', '.join(POOL_NORMS)}")


def usable_masks(masks: list[torch.Tensor], lo: float, hi: float) -> torch.Tensor:
    """B booleans: every view's mask (N x 1 x H x W in [0, 1]) covers a fraction in [lo, hi].

    The shared fallback rule of the mask-aware methods (docs/methods.md §6): a sample whose mask is
    empty or almost full in some view trains as in the original method.
    """
    ok = torch.ones(masks[0].shape[0], dtype=torch.bool, device=masks[0].device)
    for mask in masks:
        fg = mask.float().mean(dim=(1, 2, 3))
        ok &= (fg >= lo) & (fg <= hi)
    return ok


def channel_heatmap(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A^c, a class-agnostic heatmap: the channel mean of a B x C x h x w map, bilinearly
    upsampled to ``size``, then min-max normalised per image -> B x 1 x H x W in [0, 1]
    (SegAS's ApFS, occlusion by attention, class-agnostic localisation)."""
    return normalise_per_image(F.interpolate(grid.float().mean(1, keepdim=True), size=size,
                                             mode="bilinear", align_corners=False))  # fmt: skip


def normalise_per_image(a: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] per image (a constant map becomes all zeros)."""
    lo = a.amin(dim=(1, 2, 3), keepdim=True)
    hi = a.amax(dim=(1, 2, 3), keepdim=True)
    return (a - lo) / (hi - lo).clamp_min(1e-12)
