"""Shared post-processing: soft saliency map -> binary mask, the same for every method.

Binarise (fixed threshold or Otsu), drop connected components smaller than 1 % of the image
(MaskContrast's rule), and fall back to the centre-prior mask when the result is empty or
almost full; the fallback is recorded in the sample's ``status``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

MIN_COMPONENT_FRACTION = 0.01
MIN_FG_FRACTION = 0.01
MAX_FG_FRACTION = 0.99
CENTER_SIGMA = 0.25  # centre prior std as a fraction of width/height (docs/methods.md §2.1)


@dataclass(frozen=True)
class PostprocessConfig:
    threshold: float | str = 0.5  # a number in [0, 1] or "otsu"
    min_component_fraction: float = MIN_COMPONENT_FRACTION
    min_fg_fraction: float = MIN_FG_FRACTION
    max_fg_fraction: float = MAX_FG_FRACTION
    fallback: str = "center"  # "center" or "keep"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, str):
            if self.threshold != "otsu":
                raise ValueError(f"threshold must be a number in [0, 1] or 'otsu', got {self.threshold!r}")
        elif not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.fallback not in ("center", "keep"):
            raise ValueError(f"fallback must be 'center' or 'keep', got {self.fallback!r}")


# a method's final masks, kept as they are: binarised at 0.5, nothing dropped, no fallback
EXACT_POSTPROCESS = PostprocessConfig(
    threshold=0.5, min_component_fraction=0.0, min_fg_fraction=0.0, max_fg_fraction=1.0, fallback="keep"
)


@dataclass
class MaskResult:
    mask: np.ndarray  # uint8, 0 or 255
    saliency_u8: np.ndarray  # the quantised soft map the mask was cut from
    threshold: float  # the threshold actually applied, on the [0, 1] scale
    status: str  # "ok", "fallback:<reason>" or "degenerate:<reason>"


def quantize(saliency: np.ndarray) -> np.ndarray:
    """Soft map in [0, 1] -> uint8 (round half to even, saturating), the form stored as
    ``sal.png`` and fed to the metrics. Values must already be non-negative."""
    return cv2.convertScaleAbs(np.asarray(saliency, np.float32), alpha=255.0)


@functools.lru_cache(maxsize=64)  # datasets repeat a few sizes (ImageNet: 500x375, 375x500, ...)
def center_prior(height: int, width: int, sigma: float = CENTER_SIGMA) -> np.ndarray:
    """Separable Gaussian centre prior in [0, 1], peak 1 at the image centre (read-only array)."""
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) / width - 0.5
    gy = np.exp(-(ys**2) / (2 * sigma**2))
    gx = np.exp(-(xs**2) / (2 * sigma**2))
    prior = np.outer(gy, gx).astype(np.float32)
    prior.setflags(write=False)
    return prior


def threshold_u8(sal_u8: np.ndarray, t: float) -> np.ndarray:
    """Foreground = quantised value above ``t`` on the [0, 1] scale.

    Comparing on the quantised map (the one stored as ``sal.png``) means re-thresholding a
    stored soft map reproduces the stored mask exactly.
    """
    return sal_u8 > t * 255.0


def center_mask(height: int, width: int) -> np.ndarray:
    """The centre-prior map thresholded at 0.5: the baseline mask and the fallback mask."""
    return threshold_u8(quantize(center_prior(height, width)), 0.5)


def otsu_threshold(sal_u8: np.ndarray) -> float:
    """Otsu's threshold of the quantised map, on the [0, 1] scale (pixels > t are foreground)."""
    if sal_u8.min() == sal_u8.max():
        return 0.5
    t, _ = cv2.threshold(sal_u8.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def remove_small_components(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop 8-connected foreground components smaller than ``min_fraction`` of the image."""
    min_area = min_fraction * mask.size
    if min_area <= 1 or not mask.any():
        return mask
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n == 2:  # one component (the common case): its area is the foreground count
        return mask if np.count_nonzero(mask) >= min_area else np.zeros_like(mask, dtype=bool)
    keep = np.bincount(labels.ravel(), minlength=n) >= min_area
    keep[0] = False  # label 0 is the background
    return keep[labels]


def binarize(saliency: np.ndarray, config: PostprocessConfig) -> MaskResult:
    """Threshold, clean and (when degenerate) replace a soft map by the centre-prior mask."""
    sal_u8 = quantize(saliency)
    t = otsu_threshold(sal_u8) if config.threshold == "otsu" else float(config.threshold)
    fg = threshold_u8(sal_u8, t)
    fg = remove_small_components(fg, config.min_component_fraction)
    frac = float(fg.mean()) if fg.size else 0.0
    status = "ok"
    if frac < config.min_fg_fraction or frac > config.max_fg_fraction:
        reason = "empty" if frac < config.min_fg_fraction else "full"
        if config.fallback == "center":
            h, w = fg.shape
            fg = center_mask(h, w)
            status = f"fallback:{reason}"
        else:
            status = f"degenerate:{reason}"
    return MaskResult(mask=fg.astype(np.uint8) * 255, saliency_u8=sal_u8, threshold=t, status=status)
