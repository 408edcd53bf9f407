"""Binarisation, component clean-up and fallbacks against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu

from maskgen.postprocess import (
    PostprocessConfig,
    binarize,
    center_prior,
    otsu_threshold,
    quantize,
    remove_small_components,
)


def test_center_prior_peak_symmetry_and_width():
    c = center_prior(101, 61, sigma=0.25)
    assert c.shape == (101, 61)
    assert c.max() == pytest.approx(1.0, abs=1e-3) and c[50, 30] == c.max()
    np.testing.assert_allclose(c, c[::-1, ::-1], atol=1e-6)
    # along the middle row the value at x offset d (fraction of width) is exp(-d^2 / (2 sigma^2))
    xs = (np.arange(61) + 0.5) / 61 - 0.5
    np.testing.assert_allclose(c[50], np.exp(-(xs**2) / (2 * 0.25**2)) * c[50, 30], rtol=1e-5)


def test_fixed_threshold_matches_plain_comparison():
    rng = np.random.default_rng(0)
    sal = rng.random((40, 50)).astype(np.float32)
    cfg = PostprocessConfig(
        threshold=0.5, min_component_fraction=0.0, min_fg_fraction=0.0, max_fg_fraction=1.0
    )
    res = binarize(sal, cfg)
    expected = quantize(sal) > 127.5
    np.testing.assert_array_equal(res.mask > 0, expected)
    assert set(np.unique(res.mask)) <= {0, 255}
    assert res.status == "ok" and res.threshold == 0.5


def test_otsu_matches_skimage():
    rng = np.random.default_rng(1)
    sal = np.concatenate([rng.normal(0.25, 0.05, 500), rng.normal(0.75, 0.05, 300)]).clip(0, 1)
    q = quantize(sal.reshape(20, 40))
    t = otsu_threshold(q)
    # skimage's Otsu on the same integers: pixels > t are foreground in both conventions
    ref = threshold_otsu(q)
    assert (q > t * 255).sum() == (q > ref).sum()


def test_remove_small_components_matches_scipy_label():
    rng = np.random.default_rng(2)
    mask = ndimage.binary_opening(rng.random((80, 90)) > 0.6)
    out = remove_small_components(mask, 0.01)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = sizes >= 0.01 * mask.size
    np.testing.assert_array_equal(out, keep[labels])
    assert out.sum() < mask.sum()  # the random mask does hold small specks


@pytest.mark.parametrize(("value", "reason"), [(0.0, "empty"), (1.0, "full")])
def test_degenerate_masks_fall_back_to_center(value, reason):
    sal = np.full((30, 40), value, np.float32)
    res = binarize(sal, PostprocessConfig())
    assert res.status == f"fallback:{reason}"
    np.testing.assert_array_equal(res.mask > 0, quantize(center_prior(30, 40)) >= 128)
    kept = binarize(sal, PostprocessConfig(fallback="keep"))
    assert kept.status == f"degenerate:{reason}"
    assert (kept.mask > 0).mean() == (0.0 if reason == "empty" else 1.0)


def test_tiny_speck_alone_counts_as_empty():
    sal = np.zeros((100, 100), np.float32)
    sal[10:15, 10:15] = 1.0  # 0.25 % of the image: removed as a small component
    assert binarize(sal, PostprocessConfig()).status == "fallback:empty"


def test_one_pixel_image():
    res = binarize(np.ones((1, 1), np.float32), PostprocessConfig())
    assert res.mask.shape == (1, 1)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="threshold"):
        PostprocessConfig(threshold="median")
    with pytest.raises(ValueError, match="threshold"):
        PostprocessConfig(threshold=1.5)
