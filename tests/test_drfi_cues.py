"""Background cues (boundary connectivity, RBD's optimisation, manifold ranking): each against a
slow per-region reference, then on scenes where the cue must tell object from background."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from maskgen.methods.drfi import cues
from maskgen.methods.drfi.features import adjacency, pixel_features, region_features
from maskgen.methods.drfi.method import DRFI, describe_level
from maskgen.methods.drfi.scoring import FEATURE_SETS, Forest, ModelError


def grid_labels(rows: int = 4, cols: int = 5, cell: int = 6) -> np.ndarray:
    """Regions on a rows x cols grid of cell x cell blocks."""
    lab = np.arange(rows * cols).reshape(rows, cols)
    return np.kron(lab, np.ones((cell, cell), np.int64))


def toy_graph(seed: int = 0):
    lab2d = grid_labels()
    n = int(lab2d.max()) + 1
    rng = np.random.default_rng(seed)
    lab = rng.uniform([0, -60, -60], [100, 60, 60], (n, 3))
    area = np.bincount(lab2d.ravel(), minlength=n).astype(np.float64) * rng.uniform(0.5, 2.0, n)
    sides = np.zeros((n, 4), bool)
    for s, line in enumerate((lab2d[0], lab2d[-1], lab2d[:, 0], lab2d[:, -1])):
        sides[line, s] = True
    edge = np.zeros(n)
    for line in (lab2d[0], lab2d[-1], lab2d[:, 0], lab2d[:, -1]):
        edge += np.bincount(line, minlength=n)
    centroid = rng.random((n, 2))
    return lab2d, lab, area, edge, sides, centroid, adjacency(lab2d, n)


def slow_geodesic(lab, adj, on_edge):
    n = lab.shape[0]
    d = np.full((n, n), np.inf)
    np.fill_diagonal(d, 0.0)
    a = adj.toarray()
    for i, j in itertools.product(range(n), range(n)):
        if i != j and (a[i, j] or (on_edge[i] and on_edge[j])):
            d[i, j] = np.sqrt(((lab[i] - lab[j]) ** 2).sum())
    for k in range(n):  # Floyd-Warshall
        d = np.minimum(d, d[:, k : k + 1] + d[k : k + 1, :])
    return d


def test_geodesic_distances_match_floyd_warshall():
    _, lab, _, _, sides, _, adj = toy_graph()
    on_edge = sides.any(axis=1)
    np.testing.assert_allclose(cues.geodesic_distances(lab, adj, on_edge), slow_geodesic(lab, adj, on_edge),
                               rtol=1e-9, atol=1e-6)  # fmt: skip


def test_boundary_connectivity_contrast_and_optimisation_match_loops():
    _, lab, area, edge, sides, centroid, adj = toy_graph(1)
    n = area.size
    geo = slow_geodesic(lab, adj, sides.any(axis=1))
    sc = cues.SIGMA_COLOR
    bnd = np.array([
        sum(edge[i] * np.exp(-geo[p, i] ** 2 / (2 * sc**2)) for i in range(n))
        / np.sqrt(sum(area[i] * np.exp(-geo[p, i] ** 2 / (2 * sc**2)) for i in range(n)))
        for p in range(n)
    ])  # fmt: skip
    np.testing.assert_allclose(cues.boundary_connectivity(geo, area, edge), bnd, rtol=1e-9)

    w_bg = 1 - np.exp(-(bnd**2) / 2)
    ctr = np.zeros(n)
    for p, i in itertools.product(range(n), range(n)):
        spa = np.exp(-((centroid[p] - centroid[i]) ** 2).sum() / (2 * 0.25**2))
        ctr[p] += np.linalg.norm(lab[p] - lab[i]) * spa * w_bg[i] * area[i] / area.mean()
    np.testing.assert_allclose(cues.background_weighted_contrast(lab, centroid, area, w_bg), ctr, rtol=1e-9)

    # RBD's optimisation: the zero of the energy's gradient, built pair by pair
    w_fg = ctr / ctr.max()
    system, a = np.diag(w_fg + w_bg + 1e-9), adj.toarray()
    for i, j in itertools.product(range(n), range(n)):
        if i < j and a[i, j]:
            w = np.exp(-((lab[i] - lab[j]) ** 2).sum() / (2 * sc**2)) + cues.MU
            system[i, i] += w
            system[j, j] += w
            system[i, j] -= w
            system[j, i] -= w
    expected = np.clip(np.linalg.solve(system, w_fg), 0, 1)
    np.testing.assert_allclose(cues.optimise(w_fg, w_bg, lab, adj), expected, rtol=1e-7, atol=1e-9)


def test_manifold_ranking_matches_a_dense_reference():
    _, lab, _, _, sides, _, adj = toy_graph(2)
    n = lab.shape[0]
    a = adj.toarray() > 0
    on_edge = sides.any(axis=1)
    linked = [(i, j) for i in range(n) for j in range(i + 1, n)
              if a[i, j] or (a[i] & a[:, j]).any() or (on_edge[i] and on_edge[j])]  # fmt: skip
    dist = np.array([np.linalg.norm(lab[i] - lab[j]) for i, j in linked])
    dist = (dist - dist.min()) / (dist.max() - dist.min())
    weights = np.zeros((n, n))
    for (i, j), d in zip(linked, dist, strict=True):
        weights[i, j] = weights[j, i] = np.exp(-10 * d)
    aff = np.linalg.inv(np.diag(weights.sum(1) + 1e-9) - 0.99 * weights)
    np.fill_diagonal(aff, 0)
    np.testing.assert_allclose(cues.ranking_affinity(lab, adj, on_edge), aff, rtol=1e-7, atol=1e-9)

    def norm(x):
        return (x - x.min()) / (x.max() - x.min())

    bg = np.ones(n)
    for s in range(4):
        bg *= 1 - norm(aff @ sides[:, s])
    fg = norm(aff @ (bg >= bg.mean()))
    got_bg, got = cues.manifold_ranking(aff, sides)
    np.testing.assert_allclose(got_bg, bg, rtol=1e-9)
    np.testing.assert_allclose(got, fg, rtol=1e-9)


def scene(touching: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured green background and a red object, in the middle or against the bottom edge."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal([60, 140, 70], 12, (96, 128, 3)), 0, 255)
    gt = np.zeros((96, 128), bool)
    if touching:
        gt[50:, 44:84] = True  # on the bottom edge, touching it along 40 of its 448 edge pixels
    else:
        gt[28:68, 44:84] = True
    img[gt] = np.clip(rng.normal([200, 50, 40], 12, (int(gt.sum()), 3)), 0, 255)
    return img.astype(np.uint8), gt


@pytest.mark.parametrize("touching", [False, True])
def test_cues_separate_an_object_from_the_background_even_on_the_edge(touching):
    img, gt = scene(touching)
    # 16 x 16 blocks (superpixel-like), each split into its object and background parts
    blocks = np.kron(np.arange(48).reshape(6, 8), np.ones((16, 16), np.int64))
    labels = np.unique(blocks * 2 + gt, return_inverse=True)[1].reshape(gt.shape)  # consecutive ids
    _, stats = region_features(pixel_features(img), labels)
    c = cues.region_cues(stats)
    obj = np.bincount(labels.ravel(), gt.ravel()) > 0
    i = {name: k for k, name in enumerate(cues.CUE_NAMES)}
    # the object: weakly connected to the edge, strong contrast to the background, ranked first
    assert c[obj, i["bnd_connectivity"]].max() < 1.0 < 1.2 < c[~obj, i["bnd_connectivity"]].min()
    assert c[obj, i["bg_probability"]].max() < 0.4 < 0.6 < c[~obj, i["bg_probability"]].min()
    for name in ("bg_weighted_contrast", "rbd", "mr"):
        assert c[obj, i[name]].min() > c[~obj, i[name]].max() + 0.2, name


def test_rbd_scorer_finds_an_edge_touching_object():
    img, gt = scene(touching=True, seed=3)
    for scorer in ("rbd", "forest+rbd"):
        sal = DRFI(scorer=scorer, levels="multi", refine=1).predict([img])[0]
        assert sal[gt].mean() > sal[~gt].mean() + 0.4, scorer


def test_descriptor_with_cues_and_forest_width(tmp_path):
    img, _ = scene(False)
    labels = np.kron(np.arange(12).reshape(3, 4), np.ones((32, 32), np.int64))
    feats, stats = describe_level(pixel_features(img), labels, cues=True)
    assert feats.shape == (12, FEATURE_SETS["drfi+cues"])
    np.testing.assert_array_equal(feats[:, 93:], cues.region_cues(stats).astype(np.float32))
    np.testing.assert_array_equal(feats[:, :93], region_features(pixel_features(img), labels)[0])

    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(0)
    x, y = rng.random((60, 99)), rng.random(60)
    forest = Forest.from_sklearn(RandomForestRegressor(n_estimators=3, random_state=0).fit(x, y))
    assert forest.n_features == 99
    forest.save(tmp_path / "f.npz")
    again = Forest.load(tmp_path / "f.npz")
    assert again.n_features == 99
    np.testing.assert_allclose(again.predict(x), forest.predict(x))

    z = dict(np.load(tmp_path / "f.npz"))
    z["n_features"] = np.array(50)
    np.savez(tmp_path / "bad.npz", **z)
    with pytest.raises(ModelError, match="expects 50 features, DRFI has 93 or 99"):
        Forest.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("bad", ["rbd+rbd", "forest+nosuch", "", "heuristic+"])
def test_bad_scorer_lists_are_refused(bad):
    with pytest.raises(ValueError, match="scorer must be one of"):
        DRFI(scorer=bad)
    with pytest.raises(ValueError, match="model= needs a forest scorer"):
        DRFI(scorer="rbd+mr", model="x.npz")
