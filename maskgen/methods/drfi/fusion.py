"""DRFI's learned fusion of segmentation levels: one weight per level, fitted on training photos.

Published DRFI fuses its per-level saliency maps with a weighted sum whose weights are learned by
constrained least squares (weights >= 0, summing to 1) against ground truth
(``drfiLearnSaliencyFusionWeight.m``; docs/methods.md). Here the same fit is made on what the
default recipe fuses: each level's *refined* region values (``refine=1``), pooled onto the finest
level's regions, against each finest region's share of ground-truth foreground. Every photo
weighs the same (DRFI resized every map to 200 x 200 first), so each region's row is weighted by
its share of its photo's pixels.

The weights are honest only if the level scores they are fitted on are the scores photos outside
the forest's training set get: ``maskgen drfi fit --fusion learned`` cross-fits (each photo scored
by a forest fitted on the other half of the photos), then stores the weights in the model's info
(``fusion``), for the levels and the refine setting they were fitted with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize

FUSION_KEY = "fusion"  # in a forest's info: {"levels": NAME, "refine": bool, "weights": [...]}


def simplex_least_squares(x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """argmin_w sum_i weight_i (x_i . w - y_i)^2 subject to w >= 0 and sum(w) = 1 (x: n x L)."""
    x = np.asarray(x, np.float64)
    wy = np.asarray(weight, np.float64)
    gram = x.T @ (wy[:, None] * x)
    rhs = x.T @ (wy * np.asarray(y, np.float64))
    n = x.shape[1]
    scale = max(float(np.abs(gram).max()), 1e-12)  # a well-scaled problem for SLSQP
    result = minimize(
        lambda w: (w @ gram @ w - 2 * rhs @ w) / scale,
        np.full(n, 1.0 / n),
        jac=lambda w: 2 * (gram @ w - rhs) / scale,
        bounds=[(0.0, 1.0)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    w = np.clip(result.x, 0.0, None)
    return w / w.sum()


def fusion_rows(
    pooled_levels: Sequence[np.ndarray], finest_area: np.ndarray, gt_share: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One photo's least-squares rows: its finest regions' pooled level values (R x L), their
    ground-truth foreground share (R) and weights (area / the photo's pixels)."""
    x = np.stack([np.asarray(p, np.float64) for p in pooled_levels], axis=1)
    return x, np.asarray(gt_share, np.float64), finest_area / finest_area.sum()


def fusion_info(levels: str, refine: bool, weights: np.ndarray, photos: int) -> dict[str, Any]:
    """What a model file records about its fusion (JSON: the weights as exact floats)."""
    return {
        "levels": levels,
        "refine": bool(refine),
        "weights": [float(w) for w in weights],
        "photos": photos,
    }


def fusion_weights(info: dict[str, Any], levels: str, n_levels: int, refine: bool) -> np.ndarray | None:
    """The learned weights a model carries for these levels and this refine setting, or None
    (fuse uniformly). A model's malformed fusion entry raises ValueError."""
    entry = info.get(FUSION_KEY)
    if entry is None:
        return None
    weights = check_fusion_entry(entry)
    if entry.get("levels") != levels or bool(entry.get("refine")) != bool(refine) or len(weights) != n_levels:
        return None
    return np.asarray(weights, np.float64)


def check_fusion_entry(entry: Any) -> list[float]:
    """A model's ``fusion`` entry's weights, or a ValueError saying what is wrong with it."""
    weights = entry.get("weights") if isinstance(entry, dict) else None
    if (
        not isinstance(weights, list)
        or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
        or not np.isfinite(weights).all()
        or min(weights, default=-1) < 0
        or not abs(sum(weights) - 1.0) < 1e-6
    ):
        raise ValueError("fusion weights must be a list of non-negative numbers summing to 1")
    return weights
