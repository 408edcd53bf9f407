"""DRFI's shared segmentation (graphseg) and compiled kernels (kernels), each against what it
replaces: cv2.ximgproc's labels where the contrib build is installed (make install puts it in
place), libstdc++'s std::sort order, and the NumPy/SciPy expressions they stand for, bit for bit."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import shared
from PIL import Image
from scipy import sparse

from maskgen.methods.drfi import graphseg, kernels
from maskgen.methods.drfi.features import adjacency, chi2_pairwise, chi2_self, lm_responses, pixel_features
from maskgen.methods.drfi.method import DRFI
from maskgen.methods.drfi.refine import overlap_counts, region_means
from maskgen.methods.drfi.segment import DRFI15_LEVELS, MULTI_LEVELS, segment, segment_levels
from maskgen.sources.synthetic import render_scene

HAS_CONTRIB = hasattr(getattr(cv2, "ximgproc", None), "segmentation")
needs_contrib = pytest.mark.skipif(not HAS_CONTRIB, reason="opencv-contrib build not installed")


def cv2_labels(rgb: np.ndarray, sigma: float, k: float, min_size: int) -> np.ndarray:
    seg = cv2.ximgproc.segmentation.createGraphSegmentation(sigma=sigma, k=k, min_size=min_size)
    return seg.processImage(np.ascontiguousarray(rgb))


def flat_blocks(seed: int, h: int = 60, w: int = 80) -> np.ndarray:
    """Rectangles of four grey levels per channel: thousands of exactly equal edge weights."""
    rng = np.random.default_rng(seed)
    im = np.zeros((h, w, 3), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        im[y : y + rng.integers(3, 15), x : x + rng.integers(3, 15)] = rng.choice([0, 40, 80, 120], 3)
    return im


def awkward_images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        *(render_scene(s, i)[0] for s, i in [(0, 0), (1, 3), (2, 5)]),
        *(flat_blocks(seed) for seed in range(6)),
        np.zeros((1, 1, 3), np.uint8),
        np.full((1, 9, 3), 7, np.uint8),
        rng.integers(0, 255, (9, 1, 3)).astype(np.uint8),
        rng.integers(0, 3, (40, 40, 3)).astype(np.uint8),  # near-flat noise: ties everywhere
    ]


LEVELS = [(0.8, 100.0, 150), (0.8, 300.0, 1000), (0.5, 50.0, 5), (0.0, 20.0, 3)]


@needs_contrib
@pytest.mark.parametrize("index", range(len(awkward_images())))
def test_labels_are_cv2_ximgproc_bit_for_bit(index):
    rgb = awkward_images()[index]
    for sigma, k, min_size in LEVELS:
        np.testing.assert_array_equal(
            graphseg.SortedGraph(rgb, sigma).labels(k, min_size), cv2_labels(rgb, sigma, k, min_size)
        )


@needs_contrib
@pytest.mark.parametrize("dataset", ["ecssd-dev/images", "pascal-s-dev/images"])
def test_labels_are_cv2_ximgproc_on_photos_at_every_drfi_level(dataset):
    files = sorted(shared(dataset).iterdir())[:4]
    levels = sorted(set(MULTI_LEVELS) | set(DRFI15_LEVELS))
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        for labels, level in zip(segment_levels(rgb, levels), levels, strict=True):
            np.testing.assert_array_equal(labels, cv2_labels(rgb, *level), err_msg=f"{f.name} {level}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_radix_order_of_the_halved_edges_is_first_copies_of_all_four(seed):
    """Sorting only the down and right edges (stable) gives the edge list that sorting all four
    directions and keeping each pair's first copy gives, ties included (flat blocks: many)."""
    graph = graphseg.SortedGraph(flat_blocks(seed), 0.5)
    h, w = graph.shape
    full = graphseg._unpack_first_copies(graphseg.radix_sort(graphseg._edge_keys(graph._blurred)), w, h * w)
    for got, want in zip(graph._radix, full, strict=True):
        np.testing.assert_array_equal(got, want)


def test_tie_check_is_what_keeps_the_radix_order_exact():
    """On images with many equal weights the stable radix order and std::sort's order give
    different labels; the tie check must notice exactly those levels and fall back."""
    differs = 0
    for seed in range(6):
        rgb = flat_blocks(seed)
        graph = graphseg.SortedGraph(rgb, 0.5)
        h, w = graph.shape
        keys = graphseg._edge_keys(graph._blurred)
        graphseg.stl_sort(keys)
        stl = graphseg._unpack_first_copies(keys, w, h * w)
        exact, _ = graphseg._segment_sorted(*stl, h * w, np.float32(50), 5, False)
        blind, _ = graphseg._segment_sorted(*graph._radix, h * w, np.float32(50), 5, False)
        _, decided = graphseg._segment_sorted(*graph._radix, h * w, np.float32(50), 5, True)
        if not np.array_equal(blind, exact):
            differs += 1
            assert not decided  # an order-dependent level is never answered from the radix order
        np.testing.assert_array_equal(graph.labels(50, 5).ravel(), exact)
        assert graph.exact_sorts == (0 if decided else 1)
    assert differs >= 3  # the check is needed: ignoring ties would change these labels


# libstdc++ (g++ 12) output of std::sort / std::partial_sort(first, last, last) on structs
# compared by a float key, ids in input order: the ties' order is the point
GOLDEN_SORT = [10, 20, 25, 15, 30, 35, 5, 0, 33, 8, 28, 13, 3, 38, 23, 18, 31, 1, 36, 26, 21, 6, 16, 11, 39, 19, 4, 34, 9, 29, 14, 24, 12, 27, 32, 7, 17, 37, 2, 22]  # fmt: skip
GOLDEN_HEAP = [8, 24, 16, 20, 0, 28, 4, 12, 15, 3, 19, 11, 7, 23, 27, 18, 10, 22, 26, 2, 6, 14, 17, 1, 9, 21, 5, 25, 13, 29]  # fmt: skip


def packed(weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, np.float32)
    return (w.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.arange(w.size, dtype=np.uint64)


def ids(keys: np.ndarray) -> list[int]:
    return (keys & np.uint64(0xFFFFFFFF)).astype(int).tolist()


def test_stl_sort_orders_ties_as_libstdcxx():
    keys = packed([(i * 7) % 5 for i in range(40)])
    graphseg.stl_sort(keys)
    assert ids(keys) == GOLDEN_SORT
    keys = packed([(i * 11) % 4 for i in range(30)])
    graphseg._heap_sort(keys, 0, keys.size)  # introsort's fallback past its depth limit
    assert ids(keys) == GOLDEN_HEAP


def test_sorts_order_by_weight_and_radix_keeps_ties_in_input_order():
    rng = np.random.default_rng(0)
    for n, distinct in [(1, 1), (17, 2), (5000, 7), (20000, 100000)]:
        w = rng.integers(0, distinct, n).astype(np.float32) * np.float32(0.37)
        radix = graphseg.radix_sort(packed(w))
        assert ids(radix) == np.argsort(w, kind="stable").tolist()
        stl = packed(w)
        graphseg.stl_sort(stl)
        assert sorted(ids(stl)) == list(range(n))
        assert np.array_equal(w[ids(stl)], np.sort(w))


def test_segment_levels_equal_separate_calls_and_skimage_stays_available():
    rgb = render_scene(0, 5)[0]
    together = segment_levels(rgb, MULTI_LEVELS)
    for labels, level in zip(together, MULTI_LEVELS, strict=True):
        np.testing.assert_array_equal(labels, segment(rgb, *level))
        counts = np.bincount(labels.ravel())
        assert counts.min() > 0 and (counts.min() >= level[2] or counts.size == 1)
    sk = segment_levels(rgb, MULTI_LEVELS, backend="skimage")
    assert all(lab.dtype == np.int32 and lab.shape == rgb.shape[:2] for lab in sk)
    assert DRFI(levels="harl", backend="skimage").params["backend"] == "skimage"
    with pytest.raises(ValueError, match="backend must be"):
        segment_levels(rgb, MULTI_LEVELS, backend="cuda")


# ------------------------------------------------------------------ kernels vs NumPy/SciPy


def level_inputs():
    rgb = render_scene(1, 2)[0]
    pix = pixel_features(rgb)
    labels = segment(rgb, 0.8, 100, 150).reshape(-1).astype(np.int64)
    return pix, labels, int(labels.max()) + 1


@pytest.mark.parametrize("labels", ["segments", "random"])
def test_region_sums_and_deviations_equal_the_sparse_products(labels):
    """Long runs of one region (a segmentation) and a new region at almost every pixel."""
    pix, lab, n = level_inputs()
    if labels == "random":
        lab = np.random.default_rng(0).integers(0, n, lab.size)
    member = sparse.csr_matrix(
        (np.ones(lab.size, np.float32), (lab, np.arange(lab.size))), shape=(n, lab.size)
    )
    sums = kernels.region_sums(lab, pix.values, n)
    np.testing.assert_array_equal(sums, member @ pix.values)
    mean = (sums.astype(np.float64) / np.bincount(lab)[:, None]).astype(np.float32)
    dev = np.square(pix.values - mean[lab])
    np.testing.assert_array_equal(kernels.region_squared_deviations(lab, pix.values, mean), member @ dev)


def test_weighted_contrast_equals_the_einsum():
    """The descriptor's regional contrast, to the bit, against the dense expression it replaced."""
    pix, lab, n = level_inputs()
    mean = kernels.region_sums(lab, pix.values, n).astype(np.float64) / np.bincount(lab)[:, None]
    mean24 = mean[:, :24]
    weight = np.random.default_rng(1).random((n, n))
    np.fill_diagonal(weight, 0.0)
    weight /= weight.sum(axis=1, keepdims=True)
    want = np.einsum("ij,ijc->ic", weight, np.abs(mean24[:, None, :] - mean24[None, :, :]))
    np.testing.assert_array_equal(kernels.weighted_contrast(weight, mean24), want)


def test_region_means_and_overlaps_equal_bincount_and_coo():
    pix, lab, n = level_inputs()
    area = np.bincount(lab).astype(np.float64)
    values = pix.values[:, 3:6]
    by_bincount = np.stack([np.bincount(lab, values[:, c].astype(np.float64), n) for c in range(3)], 1)
    np.testing.assert_array_equal(region_means(values, lab, area), by_bincount / area[:, None])
    coarse = (lab // 3).astype(np.int32)
    dense = overlap_counts(lab, coarse, n, int(coarse.max()) + 1)
    ones = np.ones(lab.size)
    coo = sparse.coo_matrix((ones, (lab, coarse)), shape=dense.shape).tocsr()
    assert (dense != coo).nnz == 0 and np.array_equal(dense.indices, coo.indices)


def test_region_histograms_and_coordinates_equal_bincount():
    pix, lab, n = level_inputs()
    h, w = pix.height, pix.width
    offsets = np.concatenate([[0], np.cumsum(pix.n_bins)])
    counts = kernels.region_histograms(lab, pix.bins, offsets, n)
    assert counts.shape == (n, sum(pix.n_bins))
    for k, (bins, nb) in enumerate(zip(pix.bins, pix.n_bins, strict=True)):
        want = np.bincount(lab * nb + bins, minlength=n * nb).reshape(n, nb)
        np.testing.assert_array_equal(counts[:, offsets[k] : offsets[k + 1]], want)
    ys, xs = np.divmod(np.arange(lab.size), w)
    sum_x, sum_y, cols, rows = kernels.region_coordinates(lab.reshape(h, w), n)
    np.testing.assert_array_equal(sum_x, np.bincount(lab, xs, n))
    np.testing.assert_array_equal(sum_y, np.bincount(lab, ys, n))
    np.testing.assert_array_equal(cols, np.bincount(lab * w + xs, minlength=n * w).reshape(n, w))
    np.testing.assert_array_equal(rows, np.bincount(lab * h + ys, minlength=n * h).reshape(n, h))


def slow_boundaries(lab2d: np.ndarray, n: int):
    """Outline and edge pixel counts and the adjacency, pixel by pixel in Python."""
    h, w = lab2d.shape
    inner, edge, pairs = np.zeros(n, int), np.zeros(n, int), set()
    for y in range(h):
        for x in range(w):
            r = lab2d[y, x]
            edge[r] += y in (0, h - 1) or x in (0, w - 1)
            others = [lab2d[yy, xx] for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1))
                      if 0 <= yy < h and 0 <= xx < w and lab2d[yy, xx] != r]  # fmt: skip
            inner[r] += bool(others)
            pairs |= {(r, o) for o in others}
    dense = np.zeros((n, n), np.float32)
    for a, b in pairs:
        dense[a, b] = 1
    return inner, edge, dense


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (6, 1), (9, 13)])
def test_region_boundaries_equal_a_pixel_by_pixel_count(shape):
    rng = np.random.default_rng(sum(shape))
    lab2d = rng.integers(0, 4, shape)
    _, lab2d = np.unique(lab2d, return_inverse=True)
    lab2d = lab2d.reshape(shape)
    n = int(lab2d.max()) + 1
    inner, edge, keys = kernels.region_boundaries(lab2d, n)
    want_inner, want_edge, dense = slow_boundaries(lab2d, n)
    np.testing.assert_array_equal(inner, want_inner)
    np.testing.assert_array_equal(edge, want_edge)
    adj = adjacency(lab2d, n)
    np.testing.assert_array_equal(adj.toarray(), dense)
    assert adj.has_sorted_indices and adj.dtype == np.float32


def test_adjacency_keeps_the_scipy_construction_to_the_index():
    """The same CSR arrays as the COO -> CSR -> symmetric -> (> 0) chain it replaced."""
    pix, lab, n = level_inputs()
    lab2d = lab.reshape(pix.height, pix.width)
    a = np.concatenate([lab2d[:, :-1].ravel(), lab2d[:-1, :].ravel()])
    b = np.concatenate([lab2d[:, 1:].ravel(), lab2d[1:, :].ravel()])
    keep = a != b
    m = sparse.coo_matrix((np.ones(keep.sum(), np.float32), (a[keep], b[keep])), shape=(n, n)).tocsr()
    want = ((m + m.T) > 0).astype(np.float32)
    got = adjacency(lab2d, n)
    for name in ("data", "indices", "indptr"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_masked_mean_and_joint_bins_equal_the_numpy_expressions():
    pix, _, _ = level_inputs()
    mask = pix.border
    want = pix.values[mask, :24].astype(np.float64).mean(axis=0)
    assert kernels.masked_mean(pix.values, mask, 24).tobytes() == want.tobytes()
    a = np.random.default_rng(0).uniform(-0.3, 1.3, (17, 23, 3)).astype(np.float32)
    a[0, 0] = (1.0, 0.0, 0.999999)
    for x in (a, np.clip(a, 0, 1)):
        q = np.clip((x * 8).astype(np.int32), 0, 7)
        np.testing.assert_array_equal(kernels.joint_bins(x, 8), (q[..., 0] * 8 + q[..., 1]) * 8 + q[..., 2])


def test_textons_are_the_argmax_of_the_responses():
    gray = cv2.cvtColor(render_scene(2, 3)[0], cv2.COLOR_RGB2GRAY)
    gray[:8, :8] = 0  # a flat patch: every response ties there
    responses, texton = lm_responses(gray, 1.0)
    np.testing.assert_array_equal(texton, np.stack(responses, axis=2).argmax(axis=2))


def test_planned_sum_is_numpys_float32_sum():
    """The pairwise plan chi2_self sums by, against NumPy's own float32 sum, for every length
    regime (plain loop, 8 running sums, halving) and values spread over six decades."""
    rng = np.random.default_rng(0)
    for n in [*range(1, 300), 511, 512, 513, 1000, 2000, 4097]:
        x = (rng.random(n) * 10 ** rng.uniform(-3, 3, n)).astype(np.float32)
        plan = kernels.pairwise_sum_plan(n)
        scratch = np.empty(plan[0].size, np.float32), np.empty(plan[0].size + 1, np.float32)
        assert kernels._planned_sum(x, *plan, *scratch) == x.sum(), n


@pytest.mark.parametrize("bins", [1, 7, 8, 98, 128, 129, 221, 512, 2000])
def test_chi2_self_equals_the_numpy_expression(bins):
    """Below 8, up to 128 and beyond: each regime of NumPy's pairwise sum."""
    rng = np.random.default_rng(bins)
    h = rng.random((37, bins)).astype(np.float32)
    h[h < 0.5] = 0
    h /= np.maximum(h.sum(axis=1, keepdims=True), np.float32(1e-9))
    np.testing.assert_array_equal(chi2_self(h), chi2_pairwise(h, h))


@pytest.mark.parametrize("bins", [9, 130, 512])
def test_chi2_self_on_very_sparse_histograms(bins):
    """Histograms of mostly empty bins (small regions), whose few terms fall in different blocks
    and tails of NumPy's sum: still bit for bit."""
    rng = np.random.default_rng(bins + 1)
    h = rng.random((29, bins)).astype(np.float32)
    h[rng.random(h.shape) < 0.95] = 0
    h[np.arange(29), rng.integers(0, bins, 29)] = 1  # every row non-empty, as a region's histogram
    h /= h.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(chi2_self(h), chi2_pairwise(h, h))


def test_forest_mean_equals_a_level_by_level_walk():
    forest = DRFI().scorers[0].forest
    x = np.random.default_rng(0).normal(size=(300, forest.n_features)).astype(np.float32)
    xd = x.astype(np.float64)
    node = np.broadcast_to(forest.roots[:, None], (forest.roots.size, len(x))).copy()
    rows = np.arange(len(x))[None, :]
    while (forest.left[node] >= 0).any():
        inner = forest.left[node] >= 0
        go_left = xd[rows, forest.feature[node]] <= forest.threshold[node]
        node = np.where(inner, np.where(go_left, forest.left[node], forest.right[node]), node)
    np.testing.assert_array_equal(forest.predict(x), forest.value[node].mean(axis=0))
