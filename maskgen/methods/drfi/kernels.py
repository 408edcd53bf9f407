"""DRFI's per-pixel and per-tree loops, compiled by numba, each with the exact arithmetic of the
NumPy/SciPy expression it replaces (tests/test_graphseg.py compares them bit for bit).

- ``region_sums``: per-region float32 sums in ascending pixel order, what ``member @ values``
  computes with a float32 CSR membership matrix (csr_matvecs adds ``1.0f * x`` row by row);
- ``region_squared_deviations``: the same for ``(values - mean[label])**2`` in float32;
- ``region_means``: per-region float64 sums divided by the area, what one ``np.bincount(labels,
  weights)`` per column computes (a float64 sum in pixel order);
- ``chi2_self``: the chi-square distances between every two histograms, with each entry's bins
  summed as NumPy's float32 ``sum`` sums a row (pairwise: 8 running sums up to 128 terms, halves
  beyond; ``pairwise_sum_plan``), so the matrix equals ``features.chi2_pairwise(h, h)`` to the bit;
- ``masked_mean``: the float64 column means of the rows a mask selects, summed row by row as
  NumPy's ``values[mask].astype(np.float64).mean(axis=0)`` sums a C-ordered array, without the
  gathered copy;
- ``joint_bins``: the 8 x 8 x 8 joint bin of each pixel, what ``clip(int32(a * 8), 0, 7)``
  per channel gives, in one pass instead of five temporaries;
- ``region_histograms``: per-region histograms of several bin indices, what ``np.bincount(labels
  * n_bins + bins)`` counts for each, in one pass and without the N-long temporaries;
- ``weighted_contrast``: sum_j w_ij |m_ic - m_jc| for every region i and channel c, summed over
  j in order in float64 as ``np.einsum("ij,ijc->ic", w, |m_i - m_j|)`` does, without the
  R x R x C temporary;
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

import functools

import numpy as np
from numba import njit


@njit(cache=True)
def region_sums(labels: np.ndarray, values: np.ndarray, n_regions: int) -> np.ndarray:
    """R x C float32: the sum of ``values`` (N x C float32) over each region's pixels.

    A run of pixels of one region (most pixels continue their left neighbour's region) is
    summed in a small row and written back when the region changes: the additions, and so the
    float32 results, are those of a plain pixel-order loop, without a load and a store of the
    output per pixel and channel."""
    n_channels = values.shape[1]
    out = np.zeros((n_regions, n_channels), np.float32)
    run = np.zeros(n_channels, np.float32)
    r = labels[0] if labels.size else 0
    for p in range(labels.size):
        if labels[p] != r:
            out[r] = run
            r = labels[p]
            run[:] = out[r]
        for c in range(n_channels):
            run[c] = np.float32(run[c] + values[p, c])
    if labels.size:
        out[r] = run
    return out


@njit(cache=True)
def region_squared_deviations(labels: np.ndarray, values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """R x C float32: the sum over each region's pixels of ``(value - mean[region])**2``, every
    step rounded to float32 (``mean`` is float32); runs of one region summed as in
    ``region_sums``."""
    n_channels = values.shape[1]
    out = np.zeros(mean.shape, np.float32)
    run = np.zeros(n_channels, np.float32)
    centre = np.zeros(n_channels, np.float32)
    r = labels[0] if labels.size else 0
    if labels.size:
        centre[:] = mean[r]
    for p in range(labels.size):
        if labels[p] != r:
            out[r] = run
            r = labels[p]
            run[:] = out[r]
            centre[:] = mean[r]
        for c in range(n_channels):
            d = np.float32(values[p, c] - centre[c])
            run[c] = np.float32(run[c] + np.float32(d * d))
    if labels.size:
        out[r] = run
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
    """H x W x 3 float32 -> H x W int16 joint bin index (bins**3 <= 32768), each channel's bin
    clipped to 0..bins-1."""
    h, w = a.shape[:2]
    out = np.empty((h, w), np.int16)
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
def region_histograms(
    labels: np.ndarray, bins: np.ndarray, offsets: np.ndarray, n_regions: int
) -> np.ndarray:
    """R x offsets[-1] int64: every region's histograms of the K bin indices ``bins`` (K x N),
    histogram k in columns ``offsets[k]:offsets[k + 1]``, counted in one pass over the pixels."""
    out = np.zeros((n_regions, offsets[-1]), np.int64)
    for p in range(labels.size):
        r = labels[p]
        for k in range(bins.shape[0]):
            out[r, offsets[k] + bins[k, p]] += 1
    return out


@njit(cache=True)
def weighted_contrast(weight: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """R x C float64: for each region i, sum_j weight[i, j] * |mean[i] - mean[j]|."""
    n, n_channels = mean.shape
    out = np.zeros((n, n_channels), np.float64)
    for i in range(n):
        for j in range(n):
            w = weight[i, j]
            for c in range(n_channels):
                out[i, c] += w * abs(mean[i, c] - mean[j, c])
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


@functools.lru_cache(maxsize=64)  # one plan per histogram width, read-only
def pairwise_sum_plan(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy's pairwise float32 sum of ``n`` terms (``pairwise_sum`` in loops_utils.h) as data:
    its leaf blocks of up to 128 terms (first index, count) in order, and a postfix program over
    them (a block's index pushes its sum, -1 adds the top two: first half + second half). Runs
    longer than 128 are halved, the first half a multiple of 8."""
    first: list[int] = []
    count: list[int] = []
    program: list[int] = []

    def split(lo: int, m: int) -> None:
        if m <= 128:
            program.append(len(first))
            first.append(lo)
            count.append(m)
            return
        half = m // 2 - (m // 2) % 8
        split(lo, half)
        split(lo + half, m - half)
        program.append(-1)

    split(0, n)
    plan = np.array(first, np.int64), np.array(count, np.int64), np.array(program, np.int64)
    for part in plan:
        part.flags.writeable = False  # cached and shared: nobody may change it
    return plan


@njit(cache=True)
def _planned_sum(terms, block_first, block_count, program, block_sums, stack) -> np.float32:
    """NumPy's float32 sum of ``terms`` by its plan (``pairwise_sum_plan``): in a block, a plain
    loop below 8 terms, else 8 running sums added pairwise and then the tail; blocks combined
    by the program. ``block_sums`` and ``stack`` are scratch of the plan's block count."""
    for b in range(block_first.size):
        lo = block_first[b]
        cnt = block_count[b]
        if cnt < 8:
            s = np.float32(0.0)
            for k in range(lo, lo + cnt):
                s = np.float32(s + terms[k])
            block_sums[b] = s
            continue
        r0, r1, r2, r3 = terms[lo], terms[lo + 1], terms[lo + 2], terms[lo + 3]
        r4, r5, r6, r7 = terms[lo + 4], terms[lo + 5], terms[lo + 6], terms[lo + 7]
        stop = lo + cnt - cnt % 8
        for k in range(lo + 8, stop, 8):
            r0 = np.float32(r0 + terms[k])
            r1 = np.float32(r1 + terms[k + 1])
            r2 = np.float32(r2 + terms[k + 2])
            r3 = np.float32(r3 + terms[k + 3])
            r4 = np.float32(r4 + terms[k + 4])
            r5 = np.float32(r5 + terms[k + 5])
            r6 = np.float32(r6 + terms[k + 6])
            r7 = np.float32(r7 + terms[k + 7])
        s = np.float32(
            np.float32(np.float32(r0 + r1) + np.float32(r2 + r3))
            + np.float32(np.float32(r4 + r5) + np.float32(r6 + r7))
        )
        for k in range(stop, lo + cnt):
            s = np.float32(s + terms[k])
        block_sums[b] = s
    top = 0
    for op in program:
        if op >= 0:
            stack[top] = block_sums[op]
            top += 1
        else:
            stack[top - 2] = np.float32(stack[top - 2] + stack[top - 1])
            top -= 1
    return stack[0]


# error_model="numpy": no zero-divisor check in the loop (the divisor is at least eps), so the
# per-bin terms compile to vector divisions; each term is still one IEEE float32 operation chain
@njit(cache=True, error_model="numpy")
def chi2_self(h, eps, block_first, block_count, program) -> np.ndarray:
    """R x R float32: 0.5 * sum_k (h_ik - h_jk)^2 / (h_ik + h_jk + eps), symmetric, each entry's
    bins summed by ``pairwise_sum_plan(bins)`` as NumPy sums a float32 row."""
    n, bins = h.shape
    out = np.empty((n, n), np.float32)
    terms = np.empty(bins, np.float32)
    block_sums = np.empty(block_first.size, np.float32)
    stack = np.empty(block_first.size + 1, np.float32)
    for i in range(n):
        hi = h[i]
        for j in range(i, n):
            hj = h[j]
            for k in range(bins):
                d = np.float32(hi[k] - hj[k])
                terms[k] = np.float32(np.float32(d * d) / np.float32(np.float32(hi[k] + hj[k]) + eps))
            v = np.float32(
                np.float32(0.5) * _planned_sum(terms, block_first, block_count, program, block_sums, stack)
            )
            out[i, j] = v
            out[j, i] = v
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
