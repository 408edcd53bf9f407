"""Region-level saliency refinement (``--param refine=1``).

In the spirit of the saliency optimisation of Zhu et al. (CVPR 2014, "Saliency Optimization
from Robust Background Detection"): on the finest segmentation level, find region values s
that minimise

    sum_i wf_i (s_i - 1)^2 + sum_i wb_i s_i^2 + sum_{i~j} w_ij (s_i - s_j)^2,

with foreground weight wf = f^p and background weight wb = (1 - f)^p from the fused map f
(mean over the region), and smoothness w_ij = exp(-|lab_i - lab_j|^2 / (2 sigma_c^2)) + mu
between adjacent regions of similar colour. The solution pushes clear background towards 0
and clear foreground towards 1 (f = 0.5 stays 0.5 without neighbours, so the 0.5 threshold
keeps its meaning) and evens out values across similar neighbouring regions. It is one
sparse linear solve of size R (the finest level's regions).

``refine_on_image`` gives any method's soft map (``--method deep --param refine=1``) the
structure DRFI's own map has before this step: it segments the image at DRFI's levels, averages
the map over each level's regions and the levels (DRFI's uniform multi-level fusion), then
refines on the finest level. It needs only the regions' Lab means and adjacency, not the
93-d descriptor.

The constants were chosen once on held-out ECSSD images (0401-0480, disjoint from the images
the README reports on) and are fixed.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from maskgen.methods.drfi.features import PixelFeatures, RegionStats, adjacency, blurred_rgb, normalised_lab
from maskgen.methods.drfi.segment import MULTI_LEVELS, segment

SIGMA_COLOR = 0.03  # on DRFI's normalised Lab (L / 100, a / 220 + 0.5, b / 220 + 0.5)
MU = 0.01
POWER = 3
_LAB = (3, 4, 5)  # Lab columns of PixelFeatures.channels


def refine_regions(
    region_prior: np.ndarray, lab_mean: np.ndarray, adjacency: sparse.spmatrix,
    sigma_c: float = SIGMA_COLOR, mu: float = MU, power: float = POWER,
) -> np.ndarray:  # fmt: skip
    """Minimiser of the energy above for region priors ``f`` in [0, 1]; values in [0, 1]."""
    f = np.clip(np.asarray(region_prior, np.float64), 0.0, 1.0)
    n = f.size
    a = sparse.triu(adjacency, k=1).tocoo()
    w = np.exp(-((lab_mean[a.row] - lab_mean[a.col]) ** 2).sum(axis=1) / (2 * sigma_c**2)) + mu
    weights = sparse.coo_matrix((np.concatenate([w, w]), (np.concatenate([a.row, a.col]),
                                np.concatenate([a.col, a.row]))), shape=(n, n)).tocsr()  # fmt: skip
    laplacian = sparse.diags(np.asarray(weights.sum(axis=1)).ravel()) - weights
    wf, wb = f**power, (1.0 - f) ** power
    system = (sparse.diags(wf + wb + 1e-9) + laplacian).tocsc()
    return np.clip(spsolve(system, wf), 0.0, 1.0)


def _refine_labelled(
    saliency: np.ndarray, labels: np.ndarray, lab_pixels: np.ndarray, area: np.ndarray, adj: sparse.spmatrix
) -> np.ndarray:
    """Region means of the map and of Lab (N x 3 pixels) on ``labels``, solved, painted back."""
    lab = labels.reshape(-1)
    n = area.size
    prior = np.bincount(lab, saliency.reshape(-1).astype(np.float64), n) / area
    lab_mean = np.stack([np.bincount(lab, lab_pixels[:, c], n) for c in range(3)], axis=1) / area[:, None]
    return refine_regions(prior, lab_mean, adj)[labels].astype(np.float32)


def refine_map(
    saliency: np.ndarray, labels: np.ndarray, pix: PixelFeatures, stats: RegionStats
) -> np.ndarray:
    """Refine a pixel map on the regions of ``labels``; returns a pixel map."""
    return _refine_labelled(saliency, labels, pix.channels[:, _LAB], stats.area, stats.adjacency)


def region_pool(saliency: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each region's mean of the map, painted onto the region."""
    lab = labels.reshape(-1)
    n = int(lab.max()) + 1
    area = np.bincount(lab, minlength=n)
    return (np.bincount(lab, saliency.reshape(-1).astype(np.float64), n) / area)[labels].astype(np.float32)


def refine_on_image(
    saliency: np.ndarray,
    rgb: np.ndarray,
    levels: tuple[tuple[float, float, int], ...] = MULTI_LEVELS,
    backend: str | None = None,
) -> np.ndarray:
    """Pool a soft map of ``rgb`` (same height and width) over the image's regions at each of
    ``levels``, average the levels, and refine on the finest one; a map of an image that is a
    single region is returned as it is."""
    segmentations = [segment(rgb, *level, backend) for level in levels]
    finest = max(segmentations, key=lambda labels: int(labels.max()))
    n = int(finest.max()) + 1
    if n < 2:
        return np.asarray(saliency, np.float32)
    pooled = np.mean([region_pool(saliency, labels) for labels in segmentations], axis=0)
    area = np.bincount(finest.reshape(-1), minlength=n).astype(np.float64)
    lab_pixels = normalised_lab(blurred_rgb(rgb)).reshape(-1, 3)
    return _refine_labelled(pooled, finest, lab_pixels, area, adjacency(finest, n))
