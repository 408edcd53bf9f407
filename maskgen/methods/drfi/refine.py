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
sparse linear solve of size R.

DRFI's ``refine=1`` (``LevelGraph.refine``) refines each segmentation level's fused scores on that
level's own regions, averages the refined levels over the finest level's regions, and
refines that once more on the finest level. Refining every level before fusing, rather than
only the fused map, keeps a coarse level's object-sized regions from being split again by the
finest level's boundaries (docs/drfi.md has the measurements). All of it works on region vectors (the levels meet through
their pixel-overlap counts), so it costs R-sized solves, not pixel passes.

``refine_on_image`` does the same for any method's soft map (``--method deep --param
refine=1``): it segments the image at DRFI's levels and takes the map's mean over each level's
regions as that level's values. It needs only the regions' Lab means and adjacency, not the
93-d descriptor.

The constants were chosen once on held-out ECSSD images (0401-0480, disjoint from the images
the README reports on) and are fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import spsolve

from maskgen.methods.drfi import kernels
from maskgen.methods.drfi.features import (
    PixelFeatures,
    RegionStats,
    adjacency,
    blurred_rgb,
    minmax,
    normalised_lab,
)
from maskgen.methods.drfi.segment import MULTI_LEVELS, segment_levels

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


def region_means(values: np.ndarray, labels: np.ndarray, area: np.ndarray) -> np.ndarray:
    """Per-region means (R x C) of pixel values (N x C) on ``labels`` (N, 0..R-1)."""
    return kernels.region_means(labels.reshape(-1), np.ascontiguousarray(values), area)


DENSE_OVERLAP = 1 << 22  # region pairs up to which the overlap counts are one dense bincount


def overlap_counts(finest: np.ndarray, labels: np.ndarray, n_finest: int, n: int) -> sparse.csr_matrix:
    """R_finest x R: how many pixels each finest region shares with each region of ``labels``."""
    a, b = finest.reshape(-1).astype(np.int64), labels.reshape(-1)
    if n_finest * n <= DENSE_OVERLAP:  # counts are exact either way; this way is one pass
        return sparse.csr_matrix(
            np.bincount(a * n + b, minlength=n_finest * n).reshape(n_finest, n).astype(np.float64)
        )
    ones = np.ones(a.size, np.float64)
    return sparse.coo_matrix((ones, (a, b)), shape=(n_finest, n)).tocsr()


@dataclass
class LevelGraph:
    """One image's segmentation levels as the refinement needs them: each level's regions'
    areas, Lab means and adjacency, their pixel overlaps with the finest level, and which level
    is the finest."""

    areas: list[np.ndarray]
    lab_means: list[np.ndarray]
    adjacencies: list[sparse.spmatrix]
    overlaps: list[sparse.csr_matrix]
    finest: int

    @classmethod
    def build(cls, pix: PixelFeatures, labels: list[np.ndarray], stats: list[RegionStats]) -> LevelGraph:
        """From DRFI's own pixel features and region statistics (nothing recomputed)."""
        return cls._from(
            pix.channels[:, _LAB], labels, [st.area for st in stats], [st.adjacency for st in stats]
        )

    @classmethod
    def from_image(cls, rgb: np.ndarray, labels: list[np.ndarray]) -> LevelGraph:
        """From an image and its segmentations alone (no 93-d descriptor needed)."""
        areas, adjacencies = [], []
        for lab in labels:
            n = int(lab.max()) + 1
            areas.append(np.bincount(lab.reshape(-1), minlength=n).astype(np.float64))
            adjacencies.append(adjacency(lab, n))
        return cls._from(normalised_lab(blurred_rgb(rgb)).reshape(-1, 3), labels, areas, adjacencies)

    @classmethod
    def _from(
        cls, lab_pixels: np.ndarray, labels: list[np.ndarray], areas: list[np.ndarray], adjacencies: list
    ) -> LevelGraph:
        finest = max(range(len(areas)), key=lambda i: areas[i].size)
        n_fin = areas[finest].size
        return cls(
            areas=areas,
            lab_means=[region_means(lab_pixels, lab, area) for lab, area in zip(labels, areas, strict=True)],
            adjacencies=adjacencies,
            overlaps=[overlap_counts(labels[finest], lab, n_fin, area.size) for lab, area in zip(labels, areas, strict=True)],
            finest=finest,
        )  # fmt: skip

    def refine(self, level_values: list[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
        """DRFI's ``refine=1``: refine each level's region values (in [0, 1]) on its own regions,
        average the refined levels over the finest level's regions (``weights``: a learned
        weighted sum instead, docs/drfi.md "Fusion"), min-max, refine on the finest level (a
        single level: its refined values as they are). One value per finest region."""
        if len(level_values) == 1:  # one level: nothing to fuse, it is already refined on the finest regions
            return self.refine_levels(level_values)[0]
        pooled = self.pooled_levels(level_values)
        if weights is None:
            prior = minmax(sum(pooled) / (len(pooled) * self.areas[self.finest]))
        else:
            prior = minmax(sum(w * p for w, p in zip(weights, pooled, strict=True)) / self.areas[self.finest])
        return refine_regions(prior, self.lab_means[self.finest], self.adjacencies[self.finest])

    def refine_levels(self, level_values: list[np.ndarray]) -> list[np.ndarray]:
        """Each level's region values refined on that level's own regions."""
        return [
            refine_regions(v, m, a)
            for v, m, a in zip(level_values, self.lab_means, self.adjacencies, strict=True)
        ]

    def pooled_levels(self, level_values: list[np.ndarray]) -> list[np.ndarray]:
        """Each level's refined values summed over every finest region's pixels (divide by the
        finest areas for means): what the levels' fusion weighs."""
        return [o @ r for o, r in zip(self.overlaps, self.refine_levels(level_values), strict=True)]

    def share_on_levels(self, finest_values: np.ndarray) -> list[np.ndarray]:
        """Each level's regions' pixel-weighted mean of a finest-level region vector."""
        return [(o.T @ finest_values) / area for o, area in zip(self.overlaps, self.areas, strict=True)]


def refine_on_image(
    saliency: np.ndarray,
    rgb: np.ndarray,
    levels: tuple[tuple[float, float, int], ...] = MULTI_LEVELS,
    backend: str | None = None,
) -> np.ndarray:
    """Put a soft map of ``rgb`` (same height and width) on the image's regions as DRFI's
    ``refine=1`` does with its scores: each of ``levels`` takes the map's mean over each of
    its regions, then ``LevelGraph.refine``. A map of an image that is one region is returned as
    it is."""
    segmentations = segment_levels(rgb, levels, backend)
    if max(int(labels.max()) for labels in segmentations) < 1:
        return np.asarray(saliency, np.float32)
    graph = LevelGraph.from_image(rgb, segmentations)
    flat = np.asarray(saliency, np.float64).reshape(-1, 1)
    values = [
        region_means(flat, lab, area)[:, 0] for lab, area in zip(segmentations, graph.areas, strict=True)
    ]
    return graph.refine(values)[segmentations[graph.finest]].astype(np.float32)
