"""SegAS's hierarchical prototypes (HCSC's recipe): how many clusters per level, and bottom-up
spherical k-means with faiss. Used by ``methods/segas.py`` before each epoch and by the
clustering benchmark."""

from __future__ import annotations

import numpy as np

# ⟨A⟩ automatic prototype counts (segas.prototypes: null): ImageNet-1k's (30,000, 10,000, 1,000) per 1.28 M images
AUTO_PER_IMAGE = (30_000 / 1_281_167, 10_000 / 1_281_167, 1_000 / 1_281_167)


def prototype_sizes(spec: list[int] | None, n: int) -> list[int]:
    """Clusters per level, bottom-up: an explicit list, or ``None`` (auto: ImageNet-1k's ratios to the
    image count: 62 / 20 / 2 for Imagenette's 2,600 photos; at least 2, fewer than the level
    below where the counts allow)."""
    if spec is None:
        sizes, below = [], n
        for ratio in AUTO_PER_IMAGE:
            below = max(2, min(below - 1, round(ratio * n)))
            sizes.append(below)
        return sizes
    sizes, below = [int(m) for m in spec], n
    for m in sizes:
        if not 2 <= m <= below:
            raise ValueError(f"segas.prototypes {list(spec)}: each level needs 2..{below} clusters here")
        below = m
    return sizes


def hierarchical_kmeans(
    x: np.ndarray, sizes: list[int], niter: int = 20, nredo: int = 5, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bottom-up spherical k-means (faiss, as HCSC): level 1 clusters the L2-normalised
    instances, level l the centroids of level l-1. Returns per level the L2-normalised
    centroids (M_l x D) and each instance's label (n), propagated up through the levels."""
    import faiss

    points = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.arange(len(points))
    centroids, instance_labels = [], []
    for level, k in enumerate(sizes):
        km = faiss.Kmeans(points.shape[1], k, niter=niter, nredo=nredo, seed=seed + level,
                          spherical=True, verbose=False, min_points_per_centroid=1)  # fmt: skip
        km.train(points)
        _, assign = km.index.search(points, 1)
        labels = assign[:, 0][labels]  # instance -> this level, through the levels below
        centroids.append(km.centroids.copy())
        instance_labels.append(labels.astype(np.int64))
        points = km.centroids
    return centroids, instance_labels
