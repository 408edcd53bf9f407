"""Background cues on a segmentation level's region graph: boundary connectivity and manifold
ranking.

DRFI's descriptor judges a region by its contrast to its surroundings and to a fixed border
band. Both fail in the same two ways: an object that touches the image edge looks like
background, and a cluttered background looks like foreground. The two classic cures work on the
region graph instead of on fixed neighbourhoods:

- **Boundary connectivity** (Zhu, Liang, Wei, Sun, CVPR 2014, "Saliency Optimization from
  Robust Background Detection", RBD). Geodesic colour distances along adjacent regions give each
  region a soft "spanning area" ``A(p) = sum_i area_i exp(-d_geo(p, i)^2 / 2 sigma_c^2)`` and the
  length of that area on the image edge, ``L(p)``. ``BndCon(p) = L(p) / sqrt(A(p))`` is large
  for background, which is heavily connected to the edge, and small for an object even where it
  touches the edge (it touches it along a short stretch only). ``w_bg = 1 - exp(-BndCon^2 / 2)``
  is the background probability; the background-weighted contrast ``wCtr(p) = sum_i
  d_col(p, i) w_spa(p, i) w_bg(i)`` is the foreground evidence; and RBD's saliency minimises
  ``sum w_bg s^2 + sum wCtr (s - 1)^2 + sum_{i~j} w_ij (s_i - s_j)^2``.
- **Graph-based manifold ranking** (Yang, Zhang, Lu, Ruan, Yang, CVPR 2013, "Saliency
  Detection via Graph-Based Manifold Ranking", MR). On a graph joining each region to its
  neighbours and their neighbours, with every edge region joined to every other, ranking
  ``f = (D - alpha W)^-1 y`` spreads relevance from query regions along similar colours. Four
  rankings from the four sides' regions, inverted and multiplied, give a background-query map;
  ranking again from its above-mean regions gives the foreground-query map.

Regions here are DRFI's Felzenszwalb regions, not SLIC superpixels of equal size, so every sum
over regions is weighted by the regions' pixel areas (RBD's lengths and areas are in pixels;
with ~16-pixel superpixels the two agree in scale). Constants are the papers' (sigma_c = 10 in
Lab units, sigma_spa = 0.25, sigma_bndcon = 1, mu = 0.1; MR alpha = 0.99, theta = 10).

``background_cues`` returns six values per region that the forest can use as extra features
(``features.CUE_NAMES``); ``scoring.CueScorer`` makes ``rbd`` and ``mr`` scorers of their own.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import dijkstra
from scipy.sparse.linalg import spsolve

from maskgen.methods.drfi.features import CUE_NAMES, RegionStats, minmax

SIGMA_COLOR = 10.0  # RBD: geodesic and smoothness colour scale, CIE Lab units
SIGMA_SPATIAL = 0.25  # RBD: spatial weight of the contrast, image-normalised coordinates
SIGMA_BNDCON = 1.0  # RBD: w_bg = 1 - exp(-BndCon^2 / (2 sigma^2))
MU = 0.1  # RBD: smoothness floor between adjacent regions
MR_ALPHA = 0.99  # MR: ranking's balance between smoothness and fitting the queries
MR_THETA = 10.0  # MR: edge weight exp(-theta * colour distance scaled to [0, 1])


def _pairs(adjacency: sparse.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Each touching pair (i < j) once."""
    a = sparse.triu(adjacency, k=1).tocoo()
    return a.row.astype(np.int64), a.col.astype(np.int64)


def geodesic_distances(lab: np.ndarray, adjacency: sparse.spmatrix, on_edge: np.ndarray) -> np.ndarray:
    """All-pairs shortest paths over adjacent regions, each step costing the Lab distance
    between the two regions; edge regions are also joined to each other, as in RBD."""
    n = lab.shape[0]
    e = np.flatnonzero(on_edge)
    clique = sparse.coo_matrix((np.ones(e.size**2), (np.repeat(e, e.size), np.tile(e, e.size))), shape=(n, n))
    i, j = _pairs(((adjacency > 0) + clique) > 0)  # each linked pair once
    w = np.linalg.norm(lab[i] - lab[j], axis=1) + 1e-9  # a zero weight would read as "no edge"
    graph = sparse.coo_matrix((w, (i, j)), shape=(n, n)).tocsr()
    return dijkstra(graph, directed=False)


def boundary_connectivity(geo: np.ndarray, area: np.ndarray, edge_pixels: np.ndarray) -> np.ndarray:
    """RBD's BndCon(p) = L(p) / sqrt(A(p)), with the soft spanning area and edge length in pixels."""
    span = np.exp(-(geo**2) / (2 * SIGMA_COLOR**2))
    return (span @ edge_pixels) / np.sqrt(span @ area)


def background_weighted_contrast(
    lab: np.ndarray, centroid: np.ndarray, area: np.ndarray, w_bg: np.ndarray
) -> np.ndarray:
    """RBD's wCtr(p) = sum_i d_col(p, i) w_spa(p, i) w_bg(i), regions weighted by relative area."""
    d_col = np.linalg.norm(lab[:, None, :] - lab[None, :, :], axis=2)
    d_spa2 = ((centroid[:, None, :] - centroid[None, :, :]) ** 2).sum(axis=2)
    w_spa = np.exp(-d_spa2 / (2 * SIGMA_SPATIAL**2))
    return (d_col * w_spa) @ (w_bg * area / area.mean())


def optimise(w_fg: np.ndarray, w_bg: np.ndarray, lab: np.ndarray, adjacency: sparse.spmatrix) -> np.ndarray:
    """RBD's saliency optimisation: argmin_s sum w_bg s^2 + sum w_fg (s - 1)^2 + sum_{i~j} w_ij
    (s_i - s_j)^2, w_ij = exp(-d_col^2 / 2 sigma_c^2) + mu; one sparse solve of size R."""
    n = w_fg.size
    i, j = _pairs(adjacency)
    w = np.exp(-((lab[i] - lab[j]) ** 2).sum(axis=1) / (2 * SIGMA_COLOR**2)) + MU
    weights = sparse.coo_matrix((np.concatenate([w, w]), (np.concatenate([i, j]), np.concatenate([j, i]))),
                                shape=(n, n)).tocsr()  # fmt: skip
    laplacian = sparse.diags(np.asarray(weights.sum(axis=1)).ravel()) - weights
    system = (sparse.diags(w_fg + w_bg + 1e-9) + laplacian).tocsc()
    return np.clip(np.atleast_1d(spsolve(system, w_fg)), 0.0, 1.0)


def ranking_affinity(lab: np.ndarray, adjacency: sparse.spmatrix, on_edge: np.ndarray) -> np.ndarray:
    """MR's optimal affinity (D - alpha W)^-1 with a zero diagonal (a region does not rank
    itself), on the graph of neighbours, neighbours' neighbours and all edge regions joined."""
    n = lab.shape[0]
    adj = (adjacency > 0).astype(np.float64)
    ring = ((adj + adj @ adj) > 0).toarray()
    e = np.flatnonzero(on_edge)
    ring[np.ix_(e, e)] = True
    np.fill_diagonal(ring, False)
    i, j = np.nonzero(np.triu(ring))
    dist = np.linalg.norm(lab[i] - lab[j], axis=1)
    w = np.exp(-MR_THETA * minmax(dist)) if dist.size else dist
    weights = np.zeros((n, n))
    weights[i, j] = w
    weights[j, i] = w
    affinity = np.linalg.inv(np.diag(weights.sum(axis=1) + 1e-9) - MR_ALPHA * weights)
    np.fill_diagonal(affinity, 0.0)
    return affinity


def manifold_ranking(affinity: np.ndarray, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MR's two stages: the background-query map (product over the four sides of 1 - the
    normalised ranking from that side's regions) and the ranking from its above-mean regions."""
    background = np.ones(affinity.shape[0])
    for s in range(4):
        if sides[:, s].any():
            background *= 1.0 - minmax(affinity @ sides[:, s].astype(np.float64))
    queries = (background >= background.mean()).astype(np.float64)
    return background, minmax(affinity @ queries)


def background_cues(
    lab: np.ndarray,
    centroid: np.ndarray,
    area: np.ndarray,
    edge_pixels: np.ndarray,
    sides: np.ndarray,
    adjacency: sparse.spmatrix,
) -> np.ndarray:
    """R x 6: ``CUE_NAMES`` of every region of one level (``lab`` in CIE Lab units, ``sides`` R x 4
    bool: touches the top, bottom, left, right edge)."""
    n = area.size
    if n < 2:
        return np.zeros((n, len(CUE_NAMES)))
    on_edge = sides.any(axis=1)
    bndcon = boundary_connectivity(geodesic_distances(lab, adjacency, on_edge), area, edge_pixels)
    w_bg = 1.0 - np.exp(-(bndcon**2) / (2 * SIGMA_BNDCON**2))
    w_ctr = minmax(background_weighted_contrast(lab, centroid, area, w_bg))
    rbd = optimise(w_ctr, w_bg, lab, adjacency)
    mr_bg, mr = manifold_ranking(ranking_affinity(lab, adjacency, on_edge), sides)
    return np.stack([bndcon, w_bg, w_ctr, rbd, mr_bg, mr], axis=1)


def region_cues(stats: RegionStats) -> np.ndarray:
    """R x 6 background cues of one level's regions (``CUE_NAMES``)."""
    return background_cues(
        stats.lab, stats.centroid, stats.area, stats.edge_pixels, stats.sides, stats.adjacency
    )
