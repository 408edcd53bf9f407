"""DRFI: every feature group against a slow, obviously-correct per-region reference; the forest
format; labelling rules; and the method against the centre baseline."""

from __future__ import annotations

import io
import itertools
import json
import subprocess

import numpy as np
import pytest
from conftest import maskgen_cmd

from maskgen.methods.drfi.features import (
    CHI2_EPS,
    COLOR_NAMES,
    FEATURE_NAMES,
    N_FILTERS,
    POSITION_SIGMA2,
    PixelFeatures,
    lbp_codes,
    lm_filters,
    pixel_features,
    region_features,
)
from maskgen.methods.drfi.method import DRFI, fuse, level_map
from maskgen.methods.drfi.scoring import Forest, ModelError, pseudo_labels, purity_labels
from maskgen.methods.drfi.segment import segment
from maskgen.sources.synthetic import render_scene

H, W = 14, 17


def toy_labels() -> np.ndarray:
    lab = np.zeros((H, W), np.int64)
    lab[3:10, 4:12] = 1  # an inner block
    lab[:, 13:] = 2  # a strip on the right edge
    lab[10:, :5] = 3  # a corner block
    return lab


def toy_pixels(seed: int = 0) -> PixelFeatures:
    rng = np.random.default_rng(seed)
    n = H * W
    border = np.zeros((H, W), bool)
    border[:1], border[-1:], border[:, :1], border[:, -1:] = True, True, True, True
    return PixelFeatures(
        height=H,
        width=W,
        values=rng.random((n, 25)).astype(np.float32),  # 24 channels and the LBP value
        bins=np.stack([rng.integers(0, nb, n) for nb in (512, 512, 512, N_FILTERS, 256)]).astype(np.int16),
        n_bins=(512, 512, 512, N_FILTERS, 256),
        border=border.reshape(-1),
    )


def slow_descriptor(pix: PixelFeatures, lab: np.ndarray) -> np.ndarray:
    """The 93 features by loops over regions and pixels, straight from the definitions."""
    h, w = lab.shape
    flat = lab.reshape(-1)
    regions = sorted(set(flat.tolist()))
    ch = pix.channels.astype(np.float64)
    masks = {r: flat == r for r in regions}

    def hist(sel, k):
        v = np.zeros(pix.n_bins[k])
        for b in pix.bins[k][sel]:
            v[b] += 1
        return v / v.sum()

    def chi2(a, b):
        return 0.5 * sum((x - y) ** 2 / (x + y + CHI2_EPS) for x, y in zip(a, b, strict=True))

    def dists(sel_a, sel_b):
        d = [abs(ch[sel_a, c].mean() - ch[sel_b, c].mean()) for c in range(24)]
        return d + [chi2(hist(sel_a, k), hist(sel_b, k)) for k in range(5)]

    cent = {}
    for r in regions:
        ys, xs = np.nonzero(lab == r)
        cent[r] = (xs.mean() / max(h, w), ys.mean() / max(h, w))
    rows = []
    for i in regions:
        ys, xs = np.nonzero(lab == i)
        area = len(xs)
        # contrast
        wts = {j: masks[j].sum() * np.exp(-((cent[i][0] - cent[j][0]) ** 2 + (cent[i][1] - cent[j][1]) ** 2)
                                          / POSITION_SIGMA2) for j in regions if j != i}  # fmt: skip
        total = sum(wts.values())
        contrast = np.zeros(29)
        for j, wt in wts.items():
            contrast += wt / total * np.array(dists(masks[i], masks[j]))
        background = np.array(dists(masks[i], pix.border))
        # properties
        xn, yn = np.sort(xs / w), np.sort(ys / h)
        p10, p90 = int(np.floor(0.1 * (area - 1))), int(np.floor(0.9 * (area - 1)))
        perim = 0
        neighbours = set()
        for y, x in zip(ys, xs, strict=True):
            on_outline = False
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and lab[yy, xx] != i:
                    on_outline = True
                    neighbours.add(int(lab[yy, xx]))
            perim += on_outline
        sel = masks[i]
        props = [(xs / w).mean(), (ys / h).mean(), xn[p10], yn[p10], xn[p90], yn[p90], perim / (w + h),
                 (xn[p90] - xn[p10]) / (yn[p90] - yn[p10] + 1e-6)]  # fmt: skip
        props += [ch[sel, c].var() for c in range(24)]
        props += [pix.lbp_value[sel].astype(np.float64).var(), area / (h * w),
                  sum(masks[j].sum() for j in neighbours) / (h * w)]  # fmt: skip
        rows.append(np.concatenate([contrast, background, props]))
    return np.array(rows)


def test_descriptor_has_93_named_dimensions():
    assert len(FEATURE_NAMES) == 93 and len(set(FEATURE_NAMES)) == 93


def test_region_features_match_slow_reference():
    pix, lab = toy_pixels(), toy_labels()
    feats, stats = region_features(pix, lab)
    ref = slow_descriptor(pix, lab)
    assert feats.shape == (4, 93)
    for k, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(feats[:, k], ref[:, k], rtol=2e-4, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(stats.area, [np.sum(lab == r) for r in range(4)])
    # the strip on the right edge: 2 of its outline pixels per row lie on the image edge
    assert stats.border_contact[1] == 0.0 and stats.border_contact[2] > 0.5


def test_region_variances_stay_exact_on_large_smooth_regions():
    # a photo's sky: 30,000 pixels near 0.6 with a small spread. E[x^2] - E[x]^2 from float32
    # sums loses the variance to cancellation (it was 20 % off on real photos)
    rng = np.random.default_rng(5)
    h, w = 200, 300
    lab = np.zeros((h, w), np.int64)
    lab[:, 150:] = 1
    values = (0.6 + 0.01 * rng.standard_normal((h * w, 25))).astype(np.float32)
    pix = PixelFeatures(h, w, values, np.zeros((5, h * w), np.int16),
                        (512, 512, 512, N_FILTERS, 256), np.zeros(h * w, bool))  # fmt: skip
    feats, _ = region_features(pix, lab)
    var_cols = [FEATURE_NAMES.index(f"var_{c}") for c in COLOR_NAMES[:3]]
    for r in range(2):
        exact = values[lab.reshape(-1) == r, :3].astype(np.float64).var(axis=0)
        np.testing.assert_allclose(feats[r, var_cols], exact, rtol=1e-3)


def test_lbp_matches_slow_loop():
    rng = np.random.default_rng(3)
    g = rng.integers(0, 256, (6, 7)).astype(np.uint8)
    codes = lbp_codes(g)
    pad = np.pad(g, 1, mode="edge")
    order = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    for y, x in itertools.product(range(6), range(7)):
        expected = sum(1 << b for b, (dy, dx) in enumerate(order) if pad[y + 1 + dy, x + 1 + dx] >= g[y, x])
        assert codes[y, x] == expected


def test_lm_filter_bank():
    bank = lm_filters()
    assert bank.shape == (15, 19, 19)
    np.testing.assert_allclose(np.abs(bank).sum(axis=(1, 2)), 1.0, rtol=1e-5)
    for i in range(15):
        if i != 12:  # all but the plain Gaussian are zero-mean
            assert abs(bank[i].sum()) < 1e-6


def test_pixel_features_on_a_real_image():
    rgb, _, _ = render_scene(0, 3)
    pix = pixel_features(rgb)
    h, w = rgb.shape[:2]
    assert pix.channels.shape == (h * w, 24)
    assert pix.channels.min() >= -1e-6 and pix.channels.max() <= 1 + 1e-6
    assert all(b.min() >= 0 and b.max() < n for b, n in zip(pix.bins, pix.n_bins, strict=True))
    band = int(np.floor(15 * max(h, w) / 400))
    assert (
        pix.border.reshape(h, w)[:band].all() and not pix.border.reshape(h, w)[band:-band, band:-band].any()
    )


def test_segmentation_labels_consecutive_and_min_size():
    rgb, _, _ = render_scene(0, 5)
    lab = segment(rgb, 0.8, 300, 1000)
    counts = np.bincount(lab.ravel())
    assert counts.min() > 0 and lab.max() + 1 == counts.size
    assert counts.min() >= 1000 or counts.size == 1
    fine = segment(rgb, 0.8, 100, 150)
    assert fine.max() > lab.max()


def test_forest_packs_sklearn_exactly_and_round_trips(tmp_path):
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(0)
    x = rng.random((300, 93)).astype(np.float32)
    y = (x[:, 3] + x[:, 50] > 1.0).astype(float)
    model = RandomForestRegressor(n_estimators=7, max_features=15, min_samples_leaf=3, random_state=0).fit(
        x, y
    )
    forest = Forest.from_sklearn(model, info={"labels": "test"})
    xt = rng.random((50, 93)).astype(np.float32)
    np.testing.assert_allclose(forest.predict(xt), model.predict(xt), rtol=0, atol=1e-12)
    path = tmp_path / "m.npz"
    forest.save(path)
    back = Forest.load(path)
    np.testing.assert_array_equal(back.predict(xt), forest.predict(xt))
    assert back.info == {"labels": "test"}


def _corrupt(path, **changes):
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    np.savez(path, **data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feature": None}, "missing feature"),
        ({"format": np.array("something-else")}, "model format"),
        ({"n_features": np.array(12)}, "expects 12 features"),
        ({"left": np.zeros(1, np.int32)}, "different lengths"),
        ({"roots": np.array([10**6], np.int32)}, "corrupt tree structure"),
    ],
)
def test_malformed_models_give_clear_errors(tmp_path, change, message):
    from sklearn.ensemble import RandomForestRegressor

    rng = np.random.default_rng(1)
    x = rng.random((40, 93))
    model = RandomForestRegressor(n_estimators=2, random_state=0).fit(x, x[:, 0])
    path = tmp_path / "m.npz"
    Forest.from_sklearn(model).save(path)
    _corrupt(path, **change)
    with pytest.raises(ModelError, match=message) as info:
        Forest.load(path)
    assert str(path) in str(info.value)


def test_cyclic_or_garbage_models_are_refused(tmp_path):
    from sklearn.ensemble import RandomForestRegressor

    x = np.random.default_rng(2).random((40, 93))
    path = tmp_path / "m.npz"
    Forest.from_sklearn(RandomForestRegressor(n_estimators=1, random_state=0).fit(x, x[:, 0])).save(path)
    with np.load(path) as z:
        left = z["left"].copy()
    inner = np.flatnonzero(left >= 0)
    left[inner[-1]] = 0  # a child pointing back to the root: a cycle
    _corrupt(path, left=left)
    with pytest.raises(ModelError, match="corrupt"):
        Forest.load(path)
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelError, match="not a readable"):
        Forest.load(tmp_path / "junk.npz")
    with pytest.raises(ModelError, match="no such model"):
        Forest.load(tmp_path / "missing.npz")


def test_purity_and_pseudo_labels():
    lab = toy_labels()
    gt = np.zeros((H, W), bool)
    gt[3:10, 4:12] = True  # region 1 exactly
    gt[:, 13:14] = True  # a quarter of the right strip
    np.testing.assert_array_equal(purity_labels(lab, gt, 4), [0, 1, 0, 0])
    gt[:, 13:15] = True  # half of the strip: ambiguous, unused
    assert purity_labels(lab, gt, 4)[2] == -1
    _, stats = region_features(toy_pixels(), lab)
    y = pseudo_labels(np.array([0.1, 0.9, 0.8, 0.2]), stats)
    assert y[1] == 1 and y[2] == 0  # inner top scorer -> 1; edge strip -> 0 whatever its score


def test_level_map_and_fusion_end_points():
    lab = toy_labels()
    m = level_map(np.array([0.0, 2.0, 1.0, 0.5]), lab)
    assert m.min() == 0.0 and m.max() == 1.0 and m[5, 6] == 1.0
    assert m[0, 0] == 0.0
    f = fuse([m, m * 0.5])
    assert f.max() == pytest.approx(1.0) and f.min() == 0.0


def _miou(method, n=24):
    from maskgen.postprocess import PostprocessConfig, binarize

    ious = []
    for i in range(n):
        rgb, gt, _ = render_scene(11, i)
        mask = binarize(method.predict([rgb])[0], PostprocessConfig()).mask > 0
        ious.append((mask & gt).sum() / (mask | gt).sum())
    return float(np.mean(ious))


def test_drfi_beats_the_center_baseline_on_synthetic_scenes():
    from maskgen.methods.center import CenterPrior

    center = _miou(CenterPrior())
    heuristic = _miou(DRFI(scorer="heuristic"))
    forest = _miou(DRFI(scorer="forest"))
    assert heuristic > center + 0.15, (heuristic, center)
    assert forest > center + 0.15, (forest, center)


def test_fit_then_build_with_the_model(tmp_path):
    model = tmp_path / "m.npz"
    res = subprocess.run(maskgen_cmd("drfi", "fit", "--source", "sample", "--sample-size", "12", "--trees", "8",
                                     "--info", "licence=test only", "--min-leaf", "3", "--out", str(model)),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    forest = Forest.load(model)
    info = forest.info
    assert info["labels"] == "pseudo" and info["rounds"] == 1 and info["images"] == 24
    assert info["features"] == "drfi+cues" and forest.n_features == 99 and info["licence"] == "test only"
    assert info["forest"]["min_samples_leaf"] == 3 and info["forest"]["n_estimators"] == 8
    out = tmp_path / "out"
    res = subprocess.run(maskgen_cmd("build", "--method", "drfi", "--param", f"model={model}", "--sample-size", "4",
                                     "--limit", "4", "--out", str(out), "--executor", "local", "--no-progress",
                                     "--save-saliency"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = json.loads((out / "manifest.json").read_text())
    assert (
        meta["method_params"]["model"] == str(model.resolve()) and meta["method_params"]["scorer"] == "forest"
    )
    bad = tmp_path / "bad.npz"
    bad.write_text("nope")
    res = subprocess.run(maskgen_cmd("build", "--method", "drfi", "--param", f"model={bad}", "--out",
                                     str(tmp_path / "o2")), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1 and str(bad) in res.stderr


def test_masks_round_fits_on_the_methods_own_mask_labels(monkeypatch):
    from maskgen.methods.drfi import fit
    from maskgen.sources import make_source

    source = make_source("sample", {"sample_size": 3, "seed": 5})
    seen = []
    real = fit.mask_labels
    monkeypatch.setattr(
        fit, "mask_labels", lambda image, scorers: seen.append(real(image, scorers)) or seen[-1]
    )
    recipe = fit.FitRecipe(levels="multi", rounds=1, round_labels="masks", limit=3)
    forest = fit.fit_drfi(source, "sample", recipe, n_estimators=4, log=io.StringIO())
    assert len(seen) == 3  # round 1 re-labelled every image from its refined mask
    y = np.concatenate([lv for image in seen for lv in image])
    assert forest.info["round_labels"] == "masks"
    assert forest.info["n_train_regions"] == 2 * min((y == 1).sum(), (y == 0).sum())  # balanced
    with pytest.raises(ValueError, match="round labels"):
        fit.FitRecipe(rounds=1, round_labels="border", limit=1)


def test_shipped_models_say_what_they_were_fitted_on():
    from maskgen.methods.drfi.method import SHIPPED_MODELS

    default = Forest.load(SHIPPED_MODELS["default"])
    assert (
        default.info["labels"] == "gt"
        and default.info["features"] == "drfi+cues"
        and default.n_features == 99
    )
    assert "ECSSD" in default.info["data"] and "PASCAL-S" in default.info["data"] and default.info["licence"]
    unsupervised = Forest.load(SHIPPED_MODELS["unsupervised"])
    assert unsupervised.info["labels"] == "pseudo" and unsupervised.info["source"] == "sample"
    assert unsupervised.n_features == 93
    assert DRFI(model="unsupervised").params["model"] == "unsupervised"
    assert DRFI().params["model"] == "default" and DRFI().params["refine"] is True


def test_forest_is_the_same_for_any_number_of_fitting_threads():
    from maskgen.methods.drfi.fit import fit_forest

    rng = np.random.default_rng(0)
    x = rng.random((300, 93))
    y = (x[:, 3] + 0.3 * rng.random(300) > 0.6).astype(float)
    one = fit_forest(x, y, 7, {}, jobs=1, n_estimators=6)
    two = fit_forest(x, y, 7, {}, jobs=2, n_estimators=6)
    for name in ("feature", "threshold", "left", "right", "value", "roots"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    assert one.info == two.info  # the thread count is not part of the model


def test_drfi_builds_are_deterministic_and_params_recorded(tmp_path):
    from maskgen.cli import main

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["build", "--method", "drfi", "--param", "levels=multi", "--sample-size", "6", "--out", str(out),
                     "--executor", "local", "--no-progress", "--shard-size", "4"]) == 0  # fmt: skip
        outs.append(out)
    for tar in sorted((outs[0] / "shards").glob("*.tar")):
        assert tar.read_bytes() == (outs[1] / "shards" / tar.name).read_bytes()
    params = json.loads((outs[0] / "manifest.json").read_text())["method_params"]
    assert params["scorer"] == "forest" and params["model"] == "default" and len(params["segmentations"]) == 3
    assert len(params["model_sha256"]) == 16


def test_unknown_drfi_parameter_is_a_one_line_error(tmp_path):
    res = subprocess.run(maskgen_cmd("build", "--method", "drfi", "--param", "levels=nine", "--out",
                                     str(tmp_path / "o")), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (
        res.returncode == 1 and "--param levels=" in res.stderr and "must be one of harl, multi" in res.stderr
    )
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_refinement_without_neighbours_is_the_closed_form_sharpening():
    from scipy import sparse

    from maskgen.methods.drfi.refine import POWER, refine_regions

    f = np.array([0.0, 0.2, 0.5, 0.7, 1.0])
    lab = np.zeros((5, 3))
    got = refine_regions(f, lab, sparse.csr_matrix((5, 5)))
    expected = f**POWER / (f**POWER + (1 - f) ** POWER)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_refinement_evens_out_similar_neighbours_only():
    from scipy import sparse

    from maskgen.methods.drfi.refine import refine_regions

    f = np.array([0.9, 0.6, 0.6])
    lab = np.array([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.9, 0.1, 0.1]])  # region 2 has another colour
    adj = sparse.csr_matrix(np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], float))
    got = refine_regions(f, lab, adj)
    alone = refine_regions(f, lab, sparse.csr_matrix((3, 3)))
    assert got[1] > alone[1] + 0.05  # pulled up by its similar, confident neighbour
    assert abs(got[2] - alone[2]) < 0.02  # a differently coloured neighbour barely matters
    assert ((got >= 0) & (got <= 1)).all()


def _slow_region_mean(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each region's mean of a pixel map, one boolean mask per region."""
    return np.array([values[labels == r].mean() for r in range(labels.max() + 1)])


def test_level_graph_refine_matches_a_pixel_level_reference():
    from maskgen.methods.drfi.features import pixel_features, region_features
    from maskgen.methods.drfi.refine import LevelGraph, refine_regions
    from maskgen.methods.drfi.segment import MULTI_LEVELS

    rgb, _, _ = render_scene(4, 2)
    pix = pixel_features(rgb)
    labels = [segment(rgb, *level) for level in MULTI_LEVELS]
    stats = [region_features(pix, lab)[1] for lab in labels]
    rng = np.random.default_rng(1)
    values = [rng.random(st.area.size) for st in stats]
    lab_img = pix.channels[:, 3:6].reshape(*rgb.shape[:2], 3)
    lab_means = [np.stack([_slow_region_mean(lab_img[..., c], lab) for c in range(3)], 1) for lab in labels]
    # reference: refine each level, paint, average the pixel maps, pool on the finest, refine
    painted = [
        refine_regions(v, m, st.adjacency)[lab]
        for v, m, st, lab in zip(values, lab_means, stats, labels, strict=True)
    ]
    finest = int(np.argmax([st.area.size for st in stats]))
    pooled = _slow_region_mean(np.mean(painted, axis=0), labels[finest])
    prior = (pooled - pooled.min()) / (pooled.max() - pooled.min())
    expected = refine_regions(prior, lab_means[finest], stats[finest].adjacency)

    graph = LevelGraph.build(pix, labels, stats)
    assert graph.finest == finest
    np.testing.assert_allclose(graph.refine(values), expected, atol=1e-6)
    # a finest-level vector read on every level: each region's pixel share
    fg = (expected >= 0.5).astype(float)
    fg_pixels = fg[labels[finest]]
    for share, lab in zip(graph.share_on_levels(fg), labels, strict=True):
        np.testing.assert_allclose(share, _slow_region_mean(fg_pixels, lab), atol=1e-9)
    # one level: refined once on its own regions, nothing to fuse
    one = LevelGraph.build(pix, labels[:1], stats[:1])
    np.testing.assert_allclose(
        one.refine(values[:1]), refine_regions(values[0], lab_means[0], stats[0].adjacency), atol=1e-6
    )


def test_drfi_refine_paints_the_refined_levels_on_the_finest_regions():
    from maskgen.methods.drfi.features import pixel_features
    from maskgen.methods.drfi.method import describe_level, level_values
    from maskgen.methods.drfi.refine import LevelGraph
    from maskgen.methods.drfi.segment import MULTI_LEVELS

    rgb, _, _ = render_scene(5, 3)
    method = DRFI(scorer="forest+heuristic+rbd", levels="multi", refine=1)
    pix = pixel_features(rgb)
    labels = [segment(rgb, *level) for level in MULTI_LEVELS]
    described = [describe_level(pix, lab, cues=True) for lab in labels]
    scores = [[sc.score(f, st) for sc in method.scorers] for f, st in described]
    graph = LevelGraph.build(pix, labels, [st for _, st in described])
    expected = graph.refine([level_values(s) for s in scores])[labels[graph.finest]]
    np.testing.assert_allclose(method.saliency(rgb), expected, atol=1e-6)


def test_mask_round_labels_are_purity_labels_of_the_methods_own_mask():
    from maskgen.imaging import decode_image
    from maskgen.methods.drfi.fit import extract_levels, mask_labels
    from maskgen.methods.drfi.segment import MULTI_LEVELS
    from maskgen.sources import make_source

    source = make_source("sample", {"sample_size": 2, "seed": 3})
    items = source.list_items()[:2]  # the two synthetic scenes
    images, skipped = extract_levels(source, items, "multi", False, io.StringIO(), need_graph=True)
    assert skipped == 0 and len(images) == 2
    method = DRFI(
        scorer="forest+heuristic", model="unsupervised", levels="multi", refine=1
    )  # the 93-d forest
    for item, image in zip(items, images, strict=True):
        rgb = decode_image(source.read(item)).rgb
        mask = method.saliency(rgb) >= 0.5  # the method's own map, thresholded
        got = mask_labels(image, method.scorers)
        for level, y in zip(MULTI_LEVELS, got, strict=True):
            labels = segment(rgb, *level)
            np.testing.assert_array_equal(y, purity_labels(labels, mask, labels.max() + 1))
        assert any((y == 1).any() for y in got) and any((y == 0).any() for y in got)


def test_refine_on_image_takes_region_means_then_refines_like_drfi():
    from maskgen.methods.drfi.features import pixel_features, region_features
    from maskgen.methods.drfi.refine import LevelGraph, refine_on_image
    from maskgen.methods.drfi.segment import MULTI_LEVELS

    rgb, _, _ = render_scene(3, 1)
    sal = np.random.default_rng(0).random(rgb.shape[:2]).astype(np.float32)
    pix = pixel_features(rgb)
    labels = [segment(rgb, *level) for level in MULTI_LEVELS]
    stats = [region_features(pix, lab)[1] for lab in labels]  # the DRFI path: the descriptor's stats
    graph = LevelGraph.build(pix, labels, stats)
    expected = graph.refine([_slow_region_mean(sal, lab) for lab in labels])[labels[graph.finest]]
    np.testing.assert_allclose(refine_on_image(sal, rgb), expected, atol=1e-5)


def test_refine_on_image_puts_a_coarse_map_back_on_the_object():
    import cv2

    from maskgen.methods.drfi.refine import refine_on_image

    # an ellipse on a background of another colour, mild noise; the map is the mask seen through
    # a 16-pixel grid and upsampled bilinearly, as a stride-16 network's map is
    h, w = 240, 320
    fg = np.zeros((h, w), np.uint8)
    cv2.ellipse(fg, (150, 130), (70, 45), 20, 0, 360, 1, -1)
    fg = fg.astype(bool)
    rng = np.random.default_rng(0)
    rgb = np.where(fg[..., None], [200, 60, 40], [70, 120, 160]) + rng.normal(0, 6, (h, w, 3))
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    grid = cv2.resize(fg.astype(np.float32), (w // 16, h // 16), interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
    refined = refine_on_image(coarse, rgb)

    def iou(a):
        return (a & fg).sum() / (a | fg).sum()

    assert iou(refined > 0.5) > iou(coarse > 0.5) + 0.02
    assert iou(refined > 0.5) > 0.97
    flat = np.full((40, 60, 3), 128, np.uint8)  # one region: nothing to refine on
    np.testing.assert_allclose(refine_on_image(np.full((40, 60), 0.3, np.float32), flat), 0.3, atol=1e-6)


def test_refined_ensemble_runs_and_records_its_params():
    m = DRFI(scorer="forest+heuristic", levels="multi", refine=1)
    rgb, _, _ = render_scene(2, 0)
    sal = m.predict([rgb])[0]
    assert sal.shape == rgb.shape[:2] and sal.min() >= 0.0 and sal.max() <= 1.0
    p = m.params
    assert p["scorer"] == "forest+heuristic" and p["refine"] is True and p["model"] == "default"
    with pytest.raises(ValueError, match="scorer must be one of"):
        DRFI(scorer="svm")
