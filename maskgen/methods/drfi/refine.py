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

The constants were chosen once on held-out ECSSD images (0401-0480, disjoint from the images
the README reports on) and are fixed.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from maskgen.methods.drfi.features import PixelFeatures, RegionStats

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


def refine_map(
    saliency: np.ndarray, labels: np.ndarray, pix: PixelFeatures, stats: RegionStats
) -> np.ndarray:
    """Refine a pixel map on the regions of ``labels``; returns a pixel map."""
    lab = labels.reshape(-1)
    n = stats.area.size
    prior = np.bincount(lab, saliency.reshape(-1).astype(np.float64), n) / stats.area
    lab_mean = np.stack([np.bincount(lab, pix.channels[:, c], n) for c in _LAB], axis=1) / stats.area[:, None]
    return refine_regions(prior, lab_mean, stats.adjacency)[labels].astype(np.float32)
