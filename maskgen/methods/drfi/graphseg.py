"""OpenCV's Felzenszwalb-Huttenlocher segmentation, with the work several levels share done once.

``cv2.ximgproc.segmentation`` runs, per call: a Gaussian blur of the float image, a graph of
4 directed edges per pixel (up, left, down, right; weight = the Euclidean distance of the
blurred colours), ``std::sort`` of the edges by weight, the union-find pass with the
``k / |C|`` criterion, a pass merging components below ``min_size``, and a raster-order
relabelling. DRFI's three levels share sigma, so everything up to and including the sort is
the same for all of them; only the two union-find passes depend on ``k`` and ``min_size``.
This module does the shared part once per image and the cheap passes once per level.

The labels are those of ``cv2.ximgproc`` bit for bit (tests/test_graphseg.py checks this
wherever the opencv-contrib build is installed):

- the blur is the same ``cv2.GaussianBlur`` call on the same float32 image;
- weights follow the arithmetic of the shipped binaries: each squared difference and each
  partial sum rounded to float32 (the source reads ``pow(d, 2)``, which the wheels compute in
  float; widening to double agrees on photos but not on images with many equal weights), then
  a square root;
- the order of edges of *equal* weight can decide which small components merge first in the
  ``min_size`` pass. Edges are sorted by a stable radix sort, and where ties could matter
  (``_segment_sorted`` checks each run of equal weights) the image falls back to libstdc++'s
  ``std::sort`` (introsort: median-of-three quicksort down to 16 elements, heapsort past a
  depth of 2 log2 n, a final insertion sort), written out step for step (``stl_sort``), which
  orders ties exactly as the C++ does;
- the union-find keeps the C++ rules (the larger set is the root, ties to the first).

numba compiles these loops on first use (cached on disk where the package folder is writable).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from numba import njit

THRESHOLD = 16  # libstdc++'s _S_threshold: introsort leaves runs this short to insertion sort


@njit(cache=True)
def _edge_keys(img: np.ndarray, directions: tuple[int, ...] = (0, 1, 2, 3)) -> np.ndarray:
    """Directed edges in OpenCV's order (per pixel in raster order: up, left, down, right), each
    packed into one uint64: the weight's float32 bits above, ``4 * pixel + direction`` below.
    Weights are >= 0, so the high word orders like the weight, and sorting on it alone moves
    each edge's identity along with its weight in one 8-byte word. ``directions=(2, 3)`` keeps
    only the down and right edges: of each pixel pair, the copy that comes first in this order."""
    h, w, c = img.shape
    keys = np.empty(len(directions) * h * w, np.uint64)
    bits = np.empty(1, np.float32)
    as_int = bits.view(np.uint32)
    n = 0
    for i in range(h):
        for j in range(w):
            for d in directions:
                i2 = i + (-1, 0, 1, 0)[d]
                j2 = j + (0, -1, 0, 1)[d]
                if 0 <= i2 < h and 0 <= j2 < w:
                    total = np.float32(0.0)
                    for ch in range(c):
                        diff = np.float32(img[i, j, ch] - img[i2, j2, ch])
                        total = np.float32(total + np.float32(diff * diff))
                    bits[0] = np.float32(np.sqrt(np.float64(total)))
                    keys[n] = (np.uint64(as_int[0]) << np.uint64(32)) | np.uint64(4 * (i * w + j) + d)
                    n += 1
    return keys[:n]


@njit(cache=True)
def _less(a: np.uint64, b: np.uint64) -> bool:
    return (a >> np.uint64(32)) < (b >> np.uint64(32))


@njit(cache=True)
def _swap(key: np.ndarray, a: int, b: int) -> None:
    key[a], key[b] = key[b], key[a]


@njit(cache=True)
def _push_heap(key, first, hole, top, value) -> None:
    parent = (hole - 1) // 2
    while hole > top and _less(key[first + parent], value):
        key[first + hole] = key[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    key[first + hole] = value


@njit(cache=True)
def _adjust_heap(key, first, hole, length, value) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if _less(key[first + child], key[first + child - 1]):
            child -= 1
        key[first + hole] = key[first + child]
        hole = child
    if (length & 1) == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        key[first + hole] = key[first + child - 1]
        hole = child - 1
    _push_heap(key, first, hole, top, value)


@njit(cache=True)
def _heap_sort(key, first, last) -> None:
    """std::__partial_sort(first, last, last): make_heap, then sort_heap."""
    length = last - first
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _adjust_heap(key, first, parent, length, key[first + parent])
            if parent == 0:
                break
            parent -= 1
    while last - first > 1:
        last -= 1
        value = key[last]
        key[last] = key[first]
        _adjust_heap(key, first, 0, last - first, value)


@njit(cache=True)
def _median_to_first(key, result, a, b, c) -> None:
    """std::__move_median_to_first: the same comparisons in the same order."""
    if _less(key[a], key[b]):
        pick = b if _less(key[b], key[c]) else (c if _less(key[a], key[c]) else a)
    else:
        pick = a if _less(key[a], key[c]) else (c if _less(key[b], key[c]) else b)
    _swap(key, result, pick)


@njit(cache=True)
def _partition_pivot(key, first, last) -> int:
    mid = first + (last - first) // 2
    _median_to_first(key, first, first + 1, mid, last - 1)
    lo, hi = first + 1, last
    pivot = key[first]
    while True:
        while _less(key[lo], pivot):
            lo += 1
        hi -= 1
        while _less(pivot, key[hi]):
            hi -= 1
        if not lo < hi:
            return lo
        _swap(key, lo, hi)
        lo += 1


@njit(cache=True)
def _introsort_loop(key, first, last, depth) -> None:
    # the C++ recurses on the right part and loops on the left; the parts are disjoint, so an
    # explicit stack of left parts (each with its depth) gives the same result
    stack = np.empty((2 * 64 + 8, 3), np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2] = first, last, depth
    top = 1
    while top > 0:
        top -= 1
        first, last, depth = stack[top, 0], stack[top, 1], stack[top, 2]
        while last - first > THRESHOLD:
            if depth == 0:
                _heap_sort(key, first, last)
                break
            depth -= 1
            cut = _partition_pivot(key, first, last)
            stack[top, 0], stack[top, 1], stack[top, 2] = first, cut, depth
            top += 1
            first = cut


@njit(cache=True)
def _linear_insert(key, last) -> None:
    value = key[last]
    nxt = last - 1
    while _less(value, key[nxt]):
        key[last] = key[nxt]
        last = nxt
        nxt -= 1
    key[last] = value


@njit(cache=True)
def _insertion_sort(key, first, last) -> None:
    if first == last:
        return
    for i in range(first + 1, last):
        if _less(key[i], key[first]):
            value = key[i]
            for j in range(i, first, -1):
                key[j] = key[j - 1]
            key[first] = value
        else:
            _linear_insert(key, i)


@njit(cache=True)
def stl_sort(key: np.ndarray) -> None:
    """Sort packed edges in place by their high 32 bits exactly as libstdc++'s ``std::sort``
    sorts OpenCV's ``Edge`` structs by weight: the same permutation, ties included."""
    n = key.size
    if n < 2:
        return
    lg = 0  # floor(log2 n), std::__lg
    while n >> (lg + 1):
        lg += 1
    _introsort_loop(key, 0, n, 2 * lg)
    if n > THRESHOLD:
        _insertion_sort(key, 0, THRESHOLD)
        for i in range(THRESHOLD, n):
            _linear_insert(key, i)
    else:
        _insertion_sort(key, 0, n)


@njit(cache=True)
def radix_sort(keys: np.ndarray) -> np.ndarray:
    """A stable sort of packed edges by their high 32 bits (LSD radix, 8 bits a pass; a pass in
    which every key has the same digit is skipped). Ties keep their input order, which is not
    ``std::sort``'s: ``_segment_sorted`` says when that could change the labels."""
    out = keys.copy()
    buf = np.empty_like(keys)
    count = np.empty(257, np.int64)
    for shift in range(32, 64, 8):
        count[:] = 0
        for e in range(out.size):
            count[((out[e] >> np.uint64(shift)) & np.uint64(255)) + 1] += 1
        if count.max() == out.size:
            continue
        for d in range(256):
            count[d + 1] += count[d]
        for e in range(out.size):
            d = (out[e] >> np.uint64(shift)) & np.uint64(255)
            buf[count[d]] = out[e]
            count[d] += 1
        out, buf = buf, out
    return out


@njit(cache=True)
def _unpack_first_copies(keys: np.ndarray, width: int, n_pixels: int):
    """Sorted edges -> (weight, from, to), keeping of each pixel pair only the copy that comes
    first. OpenCV lists every pair twice (a->b and b->a, same weight); the later copy can never
    merge anything the earlier one did not (sets only grow, and a pair refused for a threshold
    stays refused within its weight), so dropping it leaves the labels as they are and halves
    the per-level passes."""
    seen = np.zeros(2 * n_pixels, np.bool_)
    weight = np.empty(keys.size, np.float32)  # all of them when only first copies are given
    src = np.empty(keys.size, np.int32)
    dst = np.empty(keys.size, np.int32)
    bits = np.empty(1, np.uint32)
    as_float = bits.view(np.float32)
    n = 0
    for e in range(keys.size):
        code = np.int64(keys[e] & np.uint64(0xFFFFFFFF))
        p, d = code >> 2, code & 3
        if d == 0:
            q, pair = p - width, 2 * (p - width)
        elif d == 1:
            q, pair = p - 1, 2 * (p - 1) + 1
        elif d == 2:
            q, pair = p + width, 2 * p
        else:
            q, pair = p + 1, 2 * p + 1
        if seen[pair]:
            continue
        seen[pair] = True
        bits[0] = np.uint32(keys[e] >> np.uint64(32))
        weight[n], src[n], dst[n] = as_float[0], p, q
        n += 1
    return weight[:n], src[:n], dst[:n]


@njit(cache=True)
def _find(parent: np.ndarray, p: int) -> int:
    """The set's root, halving the path on the way (the partition is what OpenCV's gives)."""
    while parent[p] != p:
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


@njit(cache=True)
def _join(parent: np.ndarray, size: np.ndarray, a: int, b: int) -> int:
    """OpenCV's joinPoints: the larger set's root (ties: ``a``) becomes the root; returns it."""
    if size[a] < size[b]:
        a, b = b, a
    parent[b] = a
    size[a] += size[b]
    return a


@njit(cache=True)
def _segment_sorted(weight, src, dst, n_pixels, k, min_size, check_ties):
    """The union-find pass, the min-size pass and the raster relabelling on sorted edges.

    Returns ``(labels, True)``, or ``(empty, False)`` when ``check_ties`` finds a run of equal
    weights whose order could decide the labels. Why only the min-size pass can depend on the
    order of ties, and when it cannot:

    - union-find pass: within a run of weight w, a set accepts an edge iff its threshold is
      >= w; a merge leaves the merged set at w + k/|C| >= w, and a set that refuses stays as it
      is. So the run joins exactly the connected groups of accepting sets, in any order, and
      each ends at w + k/|final size|;
    - min-size pass: edges between two sets of at least ``min_size`` never merge (sets only
      grow); if every smaller set meets, within the run, at most one other set, each such edge
      still sees its small set unchanged when its turn comes, so all of them merge in any order.
      Otherwise (a small set between two others) the order decides, and the caller falls back
      to ``std::sort``'s order.
    """
    parent = np.arange(n_pixels).astype(np.int32)
    size = np.ones(n_pixels, np.int32)
    kf = np.float32(k)
    threshold = np.full(n_pixels, kf, np.float32)
    for e in range(weight.size):
        a = _find(parent, src[e])
        b = _find(parent, dst[e])
        if a != b:
            w = weight[e]
            if w <= threshold[a] and w <= threshold[b]:
                a = _join(parent, size, a, b)
                threshold[a] = np.float32(w + np.float32(kf / np.float32(size[a])))
    # Each pixel's set after the first pass. An edge inside one of these sets is one OpenCV
    # skips in the min-size pass (it merged, so its weight was zeroed, or it joins a set to
    # itself), so comparing two entries replaces two walks up the trees for most edges.
    first = np.empty(n_pixels, np.int32)
    for p in range(n_pixels):
        first[p] = _find(parent, p)
    # min-size pass, one run of equal weights at a time: its live edges (two sets, one small)
    # are collected with the sets as they were when the run began, then merged in order
    run_a = np.empty(weight.size, np.int32)
    run_b = np.empty(weight.size, np.int32)
    stamp = np.full(n_pixels, -1, np.int64)
    partner = np.zeros(n_pixels, np.int32)
    e = 0
    while e < weight.size:
        end = e + 1
        while end < weight.size and weight[end] == weight[e]:
            end += 1
        live = 0
        for i in range(e, end):
            if first[src[i]] != first[dst[i]]:
                a = _find(parent, first[src[i]])
                b = _find(parent, first[dst[i]])
                if a != b and (size[a] < min_size or size[b] < min_size):
                    run_a[live], run_b[live] = a, b
                    live += 1
        if check_ties and live > 1:
            for i in range(live):
                for x, y in ((run_a[i], run_b[i]), (run_b[i], run_a[i])):
                    if size[x] < min_size:
                        if stamp[x] == e and partner[x] != y:
                            return np.empty(0, np.int32), False
                        stamp[x], partner[x] = e, y
        for i in range(live):
            a = _find(parent, run_a[i])
            b = _find(parent, run_b[i])
            if a != b and (size[a] < min_size or size[b] < min_size):
                _join(parent, size, a, b)
        e = end
    labels = np.empty(n_pixels, np.int32)
    mapped = np.full(n_pixels, -1, np.int32)
    last = 0
    for p in range(n_pixels):
        root = _find(parent, first[p])
        if mapped[root] == -1:
            mapped[root] = last
            last += 1
        labels[p] = mapped[root]
    return labels, True


class SortedGraph:
    """One image's blurred 4-neighbour graph, sorted once, ready for any ``k`` and ``min_size``.

    Edges are put in order by a radix sort (a few ms); ``std::sort``'s order (about 10x the
    cost) is computed only for an image where the order of equal weights could change a level's
    labels, which ``_segment_sorted`` detects (rare in photos: none in 150 of PASCAL-S and
    Imagenette). ``exact_sorts`` counts those.

    The radix sort sees only the down and right edges. It is stable and OpenCV's keys are in
    ascending ``4 * pixel + direction`` order, so of a pair's two copies (same weight) the down
    or right one always sorts first: sorting the halved list gives what sorting all four
    directions and keeping each pair's first copy gives, for half the work."""

    def __init__(self, rgb: np.ndarray, sigma: float):
        img = np.ascontiguousarray(rgb).astype(np.float32)
        if img.ndim == 2:
            img = img[:, :, None]
        sigma = float(sigma) if sigma > 0 else 0.001  # GraphSegmentation::setSigma's floor
        blurred = cv2.GaussianBlur(img, (0, 0), sigma, sigmaY=sigma)
        if blurred.ndim == 2:
            blurred = blurred[:, :, None]
        h, w = self.shape = img.shape[:2]
        self._blurred = np.ascontiguousarray(blurred, np.float32)
        self._radix = _unpack_first_copies(radix_sort(_edge_keys(self._blurred, (2, 3))), w, h * w)
        self._stl: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.exact_sorts = 0

    def labels(self, k: float, min_size: int) -> np.ndarray:
        """H x W int32 labels 0..R-1 in raster order of first appearance, as cv2 returns them."""
        h, w = self.shape
        flat, decided = _segment_sorted(*self._radix, h * w, np.float32(k), int(min_size), True)
        if not decided:
            if self._stl is None:
                keys = _edge_keys(self._blurred)  # std::sort is not stable: it needs all four
                stl_sort(keys)
                self._stl = _unpack_first_copies(keys, w, h * w)
                self.exact_sorts += 1
            flat, _ = _segment_sorted(*self._stl, h * w, np.float32(k), int(min_size), False)
        return flat.reshape(h, w)


def segment_levels(rgb: np.ndarray, levels: Sequence[tuple[float, float, int]]) -> list[np.ndarray]:
    """OpenCV's segmentation at each ``(sigma, k, min_size)``; levels with one sigma share a graph."""
    graphs: dict[float, SortedGraph] = {}
    out = []
    for sigma, k, min_size in levels:
        if float(sigma) not in graphs:
            graphs[float(sigma)] = SortedGraph(rgb, sigma)
        out.append(graphs[float(sigma)].labels(k, min_size))
    return out
