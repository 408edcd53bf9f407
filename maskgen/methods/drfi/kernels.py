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
    """R x R float32: 0.5 * sum_k (h_ik - h_jk)^2 / (h_ik + h_jk + eps), symmetric."""
    n, bins = h.shape
    out = np.empty((n, n), np.float32)
    terms = np.empty(bins, np.float32)
    for i in range(n):
        for j in range(i, n):
            for k in range(bins):
                d = np.float32(h[i, k] - h[j, k])
                terms[k] = np.float32(np.float32(d * d) / np.float32(np.float32(h[i, k] + h[j, k]) + eps))
            out[i, j] = out[j, i] = np.float32(np.float32(0.5) * _pairwise_sum(terms, 0, bins))
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
