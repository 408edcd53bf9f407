"""DRFI's per-pixel and per-tree loops, compiled by numba, each with the exact arithmetic of the
NumPy/SciPy expression it replaces (tests/test_graphseg.py compares them bit for bit).

- ``region_sums``: per-region float32 sums in ascending pixel order, what ``member @ values``
  computes with a float32 CSR membership matrix (csr_matvecs adds ``1.0f * x`` row by row);
- ``region_squared_deviations``: the same for ``(values - mean[label])**2`` in float32;
- ``region_means``: per-region float64 sums divided by the area, what one ``np.bincount(labels,
  weights)`` per column computes (a float64 sum in pixel order);
- ``chi2_self``: the chi-square distances between every two histograms, with each entry's bins
  summed as NumPy's float32 ``sum`` sums a row (pairwise: 8 running sums up to 128 terms, halves
  beyond), so the matrix equals ``features.chi2_pairwise(h, h)`` to the bit;
- ``masked_mean``: the float64 column means of the rows a mask selects, summed row by row as
  NumPy's ``values[mask].astype(np.float64).mean(axis=0)`` sums a C-ordered array, without the
  gathered copy;
- ``joint_bins``: the 8 x 8 x 8 joint bin of each pixel, what ``clip(int32(a * 8), 0, 7)``
  per channel gives, in one pass instead of five temporaries;
- ``region_counts``: per-region histograms of one bin index, what ``np.bincount(labels * n_bins
  + bins)`` counts, without the N-long temporary;
- ``region_coordinates``: per-region sums of x and y (integers, so exact in any order) and
  per-region counts of pixels per column and per row, for centroids and percentiles;
- ``region_boundaries``: per region, its outline pixels (a 4-neighbour of another label) and
  its image-edge pixels, and every touching pair of regions once, in one pass;
- ``forest_mean``: each tree walked with sklearn's ``x <= threshold`` in float64, the leaf
  values summed over trees in order and divided by their number, as ``value[node].mean(0)``.

One pass over the pixels replaces a sparse matrix, a gathered copy of the pixel table and a
sparse product per statistic; one pass over the trees replaces a level-by-level gather.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def region_sums(labels: np.ndarray, values: np.ndarray, n_regions: int) -> np.ndarray:
    """R x C float32: the sum of ``values`` (N x C float32) over each region's pixels."""
    out = np.zeros((n_regions, values.shape[1]), np.float32)
    for p in range(labels.size):
        r = labels[p]
        for c in range(values.shape[1]):
            out[r, c] = np.float32(out[r, c] + values[p, c])
    return out


@njit(cache=True)
def region_squared_deviations(labels: np.ndarray, values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """R x C float32: the sum over each region's pixels of ``(value - mean[region])**2``, every
    step rounded to float32 (``mean`` is float32)."""
    out = np.zeros(mean.shape, np.float32)
    for p in range(labels.size):
        r = labels[p]
        for c in range(values.shape[1]):
            d = np.float32(values[p, c] - mean[r, c])
            out[r, c] = np.float32(out[r, c] + np.float32(d * d))
    return out


@njit(cache=True)
def region_means(labels: np.ndarray, values: np.ndarray, area: np.ndarray) -> np.ndarray:
    """R x C float64: each region's mean of ``values`` (N x C), summed in float64 in pixel order."""
    out = np.zeros((area.size, values.shape[1]), np.float64)
    for p in range(labels.size):
        r = labels[p]
        for c in range(values.shape[1]):
            out[r, c] += np.float64(values[p, c])
    for r in range(area.size):
        for c in range(values.shape[1]):
            out[r, c] /= area[r]
    return out


@njit(cache=True)
def joint_bins(a: np.ndarray, bins: int) -> np.ndarray:
    """H x W x 3 float32 -> H x W int32 joint bin index, each channel's bin clipped to 0..bins-1."""
    h, w = a.shape[:2]
    out = np.empty((h, w), np.int32)
    scale = np.float32(bins)
    for y in range(h):
        for x in range(w):
            index = 0
            for c in range(3):
                q = np.int32(a[y, x, c] * scale)  # truncates toward zero, as astype(np.int32)
                index = index * bins + min(max(q, 0), bins - 1)
            out[y, x] = index
    return out


@njit(cache=True)
def masked_mean(values: np.ndarray, mask: np.ndarray, n_cols: int) -> np.ndarray:
    """The mean of ``values[mask, :n_cols]`` over its rows, in float64."""
    total = np.zeros(n_cols, np.float64)
    rows = 0
    for p in range(values.shape[0]):
        if mask[p]:
            rows += 1
            for c in range(n_cols):
                total[c] += np.float64(values[p, c])
    return total / rows


@njit(cache=True)
def region_counts(labels: np.ndarray, bins: np.ndarray, n_regions: int, n_bins: int) -> np.ndarray:
    """R x B int64: how many pixels of each region fall in each bin."""
    out = np.zeros((n_regions, n_bins), np.int64)
    for p in range(labels.size):
        out[labels[p], bins[p]] += 1
    return out


@njit(cache=True)
def region_coordinates(labels2d: np.ndarray, n_regions: int):
    """Per region of an H x W label map: the sums of x and of y (float64), and its pixel counts
    per column (R x W) and per row (R x H)."""
    h, w = labels2d.shape
    sum_x = np.zeros(n_regions, np.float64)
    sum_y = np.zeros(n_regions, np.float64)
    cols = np.zeros((n_regions, w), np.int64)
    rows = np.zeros((n_regions, h), np.int64)
    for y in range(h):
        for x in range(w):
            r = labels2d[y, x]
            sum_x[r] += x
            sum_y[r] += y
            cols[r, x] += 1
            rows[r, y] += 1
    return sum_x, sum_y, cols, rows


@njit(cache=True)
def region_boundaries(labels2d: np.ndarray, n_regions: int):
    """Per region: pixels with a 4-neighbour of another label, pixels on the image edge; and the
    touching pairs as sorted unique keys ``min * R + max``."""
    h, w = labels2d.shape
    inner = np.zeros(n_regions, np.int64)
    edge = np.zeros(n_regions, np.int64)
    keys = np.empty(2 * h * w, np.int64)
    k = 0
    for y in range(h):
        for x in range(w):
            r = labels2d[y, x]
            if y == 0 or y == h - 1 or x == 0 or x == w - 1:
                edge[r] += 1
            outline = False
            if x + 1 < w and labels2d[y, x + 1] != r:
                s = labels2d[y, x + 1]
                keys[k] = min(r, s) * n_regions + max(r, s)
                k += 1
                outline = True
            if y + 1 < h and labels2d[y + 1, x] != r:
                s = labels2d[y + 1, x]
                keys[k] = min(r, s) * n_regions + max(r, s)
                k += 1
                outline = True
            if not outline:
                outline = (x > 0 and labels2d[y, x - 1] != r) or (y > 0 and labels2d[y - 1, x] != r)
            if outline:
                inner[r] += 1
    return inner, edge, np.unique(keys[:k])


@njit(cache=True)
def _block_sum(buf: np.ndarray, lo: int, n: int) -> np.float32:
    """NumPy's float32 sum of up to 128 terms: a plain loop below 8, else 8 running sums."""
    if n < 8:
        res = np.float32(0.0)
        for i in range(lo, lo + n):
            res = np.float32(res + buf[i])
        return res
    if n <= 128:
        r0 = buf[lo]
        r1 = buf[lo + 1]
        r2 = buf[lo + 2]
        r3 = buf[lo + 3]
        r4 = buf[lo + 4]
        r5 = buf[lo + 5]
        r6 = buf[lo + 6]
        r7 = buf[lo + 7]
        i = 8
        stop = n - n % 8
        while i < stop:
            r0 = np.float32(r0 + buf[lo + i])
            r1 = np.float32(r1 + buf[lo + i + 1])
            r2 = np.float32(r2 + buf[lo + i + 2])
            r3 = np.float32(r3 + buf[lo + i + 3])
            r4 = np.float32(r4 + buf[lo + i + 4])
            r5 = np.float32(r5 + buf[lo + i + 5])
            r6 = np.float32(r6 + buf[lo + i + 6])
            r7 = np.float32(r7 + buf[lo + i + 7])
            i += 8
        res = np.float32(
            np.float32(np.float32(r0 + r1) + np.float32(r2 + r3))
            + np.float32(np.float32(r4 + r5) + np.float32(r6 + r7))
        )
        while i < n:
            res = np.float32(res + buf[lo + i])
            i += 1
        return res


@njit(cache=True)
def _pairwise_sum(buf: np.ndarray, lo: int, n: int) -> np.float32:
    """NumPy's pairwise float32 sum of ``buf[lo:lo + n]`` (``pairwise_sum`` in loops_utils.h):
    blocks of up to 128 terms, longer runs halved (the first half a multiple of 8) and the two
    halves' sums added. Written with an explicit stack: numba cannot load a recursive function
    from its on-disk cache."""
    if n <= 128:
        return _block_sum(buf, lo, n)
    task_lo = np.empty(64, np.int64)
    task_n = np.empty(64, np.int64)
    task_stage = np.empty(64, np.int64)
    sums = np.empty(64, np.float32)
    top, n_sums = 1, 0
    task_lo[0], task_n[0], task_stage[0] = lo, n, 0
    while top > 0:
        t = top - 1
        if task_n[t] <= 128:
            sums[n_sums] = _block_sum(buf, task_lo[t], task_n[t])
            n_sums += 1
            top -= 1
            continue
        half = task_n[t] // 2
        half -= half % 8
        if task_stage[t] == 0:  # the first half
            task_stage[t] = 1
            task_lo[top], task_n[top], task_stage[top] = task_lo[t], half, 0
            top += 1
        elif task_stage[t] == 1:  # then the second
            task_stage[t] = 2
            task_lo[top], task_n[top], task_stage[top] = task_lo[t] + half, task_n[t] - half, 0
            top += 1
        else:  # both done: first + second
            n_sums -= 1
            sums[n_sums - 1] = np.float32(sums[n_sums - 1] + sums[n_sums])
            top -= 1
    return sums[0]


@njit(cache=True)
def chi2_self(h: np.ndarray, eps: np.float32) -> np.ndarray:
    """R x R float32: 0.5 * sum_k (h_ik - h_jk)^2 / (h_ik + h_jk + eps), symmetric.

    A bin empty in both histograms contributes exactly +0.0, so only the bins where either is
    non-zero are computed (histograms of small regions are sparse); the sum still runs over
    every bin in NumPy's order, so the result is the same to the bit."""
    n, bins = h.shape
    out = np.empty((n, n), np.float32)
    terms = np.zeros(bins, np.float32)
    start = np.zeros(n + 1, np.int64)
    for i in range(n):
        start[i + 1] = start[i] + np.count_nonzero(h[i])
    nonzero = np.empty(start[n], np.int64)
    for i in range(n):
        m = start[i]
        for k in range(bins):
            if h[i, k] != 0:
                nonzero[m] = k
                m += 1
    for i in range(n):
        for j in range(i, n):
            for row in (i, j):
                for m in range(start[row], start[row + 1]):
                    k = nonzero[m]
                    d = np.float32(h[i, k] - h[j, k])
                    terms[k] = np.float32(np.float32(d * d) / np.float32(np.float32(h[i, k] + h[j, k]) + eps))
            out[i, j] = out[j, i] = np.float32(np.float32(0.5) * _pairwise_sum(terms, 0, bins))
            for row in (i, j):
                for m in range(start[row], start[row + 1]):
                    terms[nonzero[m]] = 0
    return out


@njit(cache=True)
def forest_mean(x, feature, threshold, left, right, value, roots) -> np.ndarray:
    """Mean over trees of each row's leaf value (``x`` float64, n x features)."""
    n = x.shape[0]
    out = np.zeros(n, np.float64)
    for t in range(roots.size):
        for i in range(n):
            node = roots[t]
            while left[node] >= 0:
                node = left[node] if x[i, feature[node]] <= threshold[node] else right[node]
            out[i] += value[node]
    return out / roots.size
