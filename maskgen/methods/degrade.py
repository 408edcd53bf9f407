"""Exact masks made worse to a chosen IoU, with errors shaped like a real method's.

A saliency method does not get pixels wrong one by one: it misses whole parts of an object,
takes in background regions next to it (an object merged with its surroundings), and puts the
boundary in the wrong place. So the errors here are made of the image's own segments
(Felzenszwalb's graph segmentation, the regions DRFI itself scores) plus a boundary shift:

1. Split the image into segments; a segment mostly inside the true mask is an object part
   (it can be missed), one mostly outside is a background part (it can be added, the nearer
   to the object the likelier, so added regions tend to merge with it).
2. Walk a random order of such misses and additions (the share of misses drawn per image)
   and apply each one that keeps the IoU at or above ``quality - TOLERANCE``, until the IoU is
   within ``TOLERANCE`` above ``quality``.
3. If segments alone cannot get there (one large segment, a target near 1), grow or shrink the
   boundary by whole pixels (a disc), to the radius whose IoU is nearest the target.

The random stream comes from the seed and the mask's own content, so a mask's degraded version
does not depend on the shard, batch or worker it was made in.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np
from skimage.segmentation import felzenszwalb

TOLERANCE = 0.02  # how far from the target one mask's IoU may end
SEGMENT_SCALE = 200.0  # Felzenszwalb's k: segments of a few % of the photo
SEGMENT_SIGMA = 0.8
MIN_SEGMENT_FRACTION = 0.004  # of the image area


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def mask_rng(truth: np.ndarray, seed: int) -> np.random.Generator:
    """A generator fixed by ``seed`` and the mask itself (its size and pixels)."""
    digest = zlib.crc32(np.packbits(truth).tobytes(), zlib.crc32(repr(truth.shape).encode()))
    return np.random.default_rng([int(seed), digest])


def image_segments(image: np.ndarray) -> np.ndarray:
    """Felzenszwalb segment labels (H x W, int) of an RGB uint8 image."""
    min_size = max(8, int(MIN_SEGMENT_FRACTION * image.shape[0] * image.shape[1]))
    return felzenszwalb(image, scale=SEGMENT_SCALE, sigma=SEGMENT_SIGMA, min_size=min_size)


def _edit_order(truth: np.ndarray, segments: np.ndarray, rng: np.random.Generator) -> list[tuple[bool, int]]:
    """A random order of segment edits: (True, s) misses segment s, (False, s) adds it."""
    n = int(segments.max()) + 1
    size = np.bincount(segments.ravel(), minlength=n)
    inside = np.bincount(segments.ravel(), weights=truth.ravel(), minlength=n)
    object_parts = np.flatnonzero((size > 0) & (inside > size / 2))
    background = np.flatnonzero((size > 0) & (inside <= size / 2))
    # background regions near the object first, with random keys (Gumbel top-k on the weights)
    dist = cv2.distanceTransform((~truth).astype(np.uint8), cv2.DIST_L2, 3)
    mean_dist = np.bincount(segments.ravel(), weights=dist.ravel(), minlength=n) / np.maximum(size, 1)
    scale = 0.1 * float(np.hypot(*truth.shape))
    keys = -mean_dist[background] / scale + rng.gumbel(size=background.size)
    adds = list(background[np.argsort(-keys)])
    misses = list(rng.permutation(object_parts))
    share_missed = rng.uniform(0.3, 0.7)
    order: list[tuple[bool, int]] = []
    while misses or adds:
        take_miss = bool(misses) and (not adds or rng.random() < share_missed)
        order.append((True, int(misses.pop())) if take_miss else (False, int(adds.pop(0))))
    return order


def _shift_boundary(
    mask: np.ndarray, truth: np.ndarray, quality: float, grow: bool, rng: np.random.Generator
) -> np.ndarray:
    """``mask`` dilated (``grow``) or eroded to IoU ``quality``: whole disc radii while the IoU
    stays above the target (binary search: it falls with the radius), then the next ring only
    along one contiguous arc (from a random angle round the mask's centre), as long as the
    target needs: a boundary wrong on one side, not a pixel noise."""
    op = cv2.dilate if grow else cv2.erode
    u8 = mask.astype(np.uint8)

    def shifted(r: int) -> np.ndarray:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        return op(u8, disc).astype(bool)

    low, high = 1, max(mask.shape)
    while low < high:  # the smallest radius with IoU <= quality
        mid = (low + high) // 2
        if iou(shifted(mid), truth) <= quality:
            high = mid
        else:
            low = mid + 1
    inner, outer = shifted(low - 1), shifted(low)
    ys, xs = np.nonzero(inner ^ outer)
    if ys.size == 0:
        return outer
    cy, cx = np.argwhere(mask).mean(axis=0) if mask.any() else (truth.shape[0] / 2, truth.shape[1] / 2)
    angle = (np.arctan2(ys - cy, xs - cx) - rng.uniform(-np.pi, np.pi)) % (2 * np.pi)
    order = np.argsort(angle, kind="stable")
    in_truth = truth[ys[order], xs[order]].astype(np.int64)
    sign = 1 if grow else -1  # a grown pixel joins the mask, an eroded one leaves it
    inter = np.count_nonzero(inner & truth) + sign * np.cumsum(in_truth)
    union = np.count_nonzero(inner | truth) + sign * np.cumsum(1 - in_truth)
    k = int(np.argmin(np.abs(inter / np.maximum(union, 1) - quality))) + 1
    out = inner.copy()
    out[ys[order[:k]], xs[order[:k]]] = grow
    return out


def degrade(truth: np.ndarray, image: np.ndarray, quality: float, seed: int = 0) -> np.ndarray:
    """A bool mask whose IoU with ``truth`` (bool H x W) is near ``quality`` (within
    TOLERANCE where the image's segments and a boundary shift allow it)."""
    truth = truth.astype(bool)
    if quality >= 1.0 or not truth.any():
        return truth.copy()
    rng = mask_rng(truth, seed)
    segments = image_segments(image)
    mask = truth.copy()
    for miss, s in _edit_order(truth, segments, rng):
        if iou(mask, truth) <= quality + TOLERANCE:
            break
        region = segments == s
        edited = mask & ~region if miss else mask | region
        if iou(edited, truth) >= quality - TOLERANCE:
            mask = edited
    if iou(mask, truth) > quality + TOLERANCE:
        grow = bool(rng.random() < 0.5) if mask.mean() < 0.5 else False
        mask = _shift_boundary(mask, truth, quality, grow, rng)
    return mask
