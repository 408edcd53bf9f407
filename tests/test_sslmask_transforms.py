"""Joint image+mask augmentation: geometry shared, colour on the image only, reproducible."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from sslmask.transforms import ViewSpec, byol_views, eval_view, make_view, mask_integral, sample_crop

NO_COLOUR = ViewSpec(size=64, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _scene(h=120, w=160):
    """Dark image with a bright L-shaped object exactly where the mask is set."""
    mask = np.zeros((h, w), bool)
    mask[30:90, 40:70] = True
    mask[70:90, 70:130] = True
    img = np.where(mask[..., None], 220, 30).astype(np.uint8).repeat(3, axis=2)
    return Image.fromarray(img), Image.fromarray(mask.astype(np.uint8) * 255), mask


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", range(12))
def test_crops_and_flips_keep_mask_on_the_object(seed):
    image, mask_img, mask = _scene()
    view, view_mask = make_view(_gen(seed), NO_COLOUR, image, mask_img, mask_integral(mask))[:2]
    bright = view[0].numpy() > 125
    marked = view_mask[0].numpy() > 127
    # away from the object's outline (where both resamplings blend), they agree exactly
    edge = ndimage.binary_dilation(bright ^ ndimage.binary_erosion(bright), iterations=2)
    edge |= ndimage.binary_dilation(marked ^ ndimage.binary_erosion(marked), iterations=2)
    assert np.array_equal(bright & ~edge, marked & ~edge)
    assert view.dtype == torch.uint8 and view.shape == (3, 64, 64) and view_mask.shape == (1, 64, 64)


def test_flip_is_applied_to_both():
    image, mask_img, mask = _scene()
    spec = dataclasses.replace(NO_COLOUR, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    flipped = dataclasses.replace(spec, flip_p=1.0)
    a_img, a_mask = make_view(_gen(0), spec, image, mask_img)[:2]
    b_img, b_mask = make_view(_gen(0), dataclasses.replace(spec, flip_p=0.0), image, mask_img)[:2]
    c_img, c_mask = make_view(_gen(0), flipped, image, mask_img)[:2]
    assert torch.equal(a_mask, b_mask) or torch.equal(a_mask, c_mask)
    assert torch.equal(c_mask, b_mask.flip(-1)) and torch.equal(c_img, b_img.flip(-1))


def test_colour_touches_the_image_only_and_views_are_reproducible():
    image, mask_img, mask = _scene()
    strong = dataclasses.replace(NO_COLOUR, jitter_p=1.0, gray_p=0.5, blur_p=1.0, solarize_p=1.0)
    plain_img, plain_mask = make_view(_gen(5), NO_COLOUR, image, mask_img)[:2]
    img, m = make_view(_gen(5), strong, image, mask_img)[:2]
    assert torch.equal(m, plain_mask) and not torch.equal(img, plain_img)
    again_img, again_mask = make_view(_gen(5), strong, image, mask_img)[:2]
    assert torch.equal(img, again_img) and torch.equal(m, again_mask)
    other, _ = make_view(_gen(6), strong, image, mask_img)[:2]
    assert not torch.equal(img, other)


def test_solarize_and_gray():
    image, mask_img, _ = _scene()
    spec = dataclasses.replace(NO_COLOUR, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), flip_p=0.0)
    plain, _ = make_view(_gen(0), spec, image, mask_img)[:2]
    sol, _ = make_view(_gen(0), dataclasses.replace(spec, solarize_p=1.0), image, mask_img)[:2]
    expected = torch.where(plain >= 128, 255 - plain, plain)
    assert torch.equal(sol, expected)
    gray, _ = make_view(_gen(0), dataclasses.replace(spec, gray_p=1.0), image, mask_img)[:2]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_crop_sampler_respects_scale_and_ratio():
    g = _gen(0)
    for _ in range(200):
        top, left, h, w = sample_crop(g, 300, 400, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top <= 300 - h and 0 <= left <= 400 - w
        assert 0.07 * 120000 <= h * w <= 120000
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_mask_guided_recrop_finds_the_small_object():
    h, w = 200, 200
    mask = np.zeros((h, w), bool)
    mask[130:200, 130:200] = True  # 12 % of the image, in a corner
    image = Image.fromarray(np.zeros((h, w, 3), np.uint8))
    mask_img = Image.fromarray(mask.astype(np.uint8) * 255)
    integral = mask_integral(mask)

    def mean_fg(min_fg):
        spec = dataclasses.replace(NO_COLOUR, min_fg=min_fg)
        fgs = [
            float(make_view(_gen(s), spec, image, mask_img, integral)[1].float().mean() / 255)
            for s in range(60)
        ]
        return np.mean(fgs), np.mean(np.array(fgs) >= 0.2)

    plain_mean, plain_hits = mean_fg(0.0)
    guided_mean, guided_hits = mean_fg(0.2)
    assert guided_mean > 1.5 * plain_mean and guided_hits >= plain_hits + 0.08, (
        plain_mean,
        guided_mean,
        plain_hits,
        guided_hits,
    )


def test_byol_view_pair_and_eval_view():
    t, t2 = byol_views(96, min_fg=0.2)
    assert (t.blur_p, t.solarize_p, t2.blur_p, t2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert t.min_fg == t2.min_fg == 0.2
    image, _, _ = _scene(100, 300)
    out = eval_view(image, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    # centre crop of a wide image keeps the middle: its left and right edges are background
    assert out[0, 32, 0] < 60 and out[0, 32, 63] < 60


@pytest.mark.parametrize("op", ["adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"])
def test_colour_jitter_on_pil_matches_the_tensor_operation_up_to_rounding(op):
    """The jitter runs on PIL images for speed; each operation must do what the tensor one does
    (hue to within PIL's 8-bit HSV: a few levels on the 1 % of pixels where it rounds most)."""
    import torchvision.transforms.v2.functional as TF
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    arr[:20] = np.clip(arr[:20] // 3 + np.array([150, 40, 90]), 0, 255)  # saturated colours too
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    for factor in (0.6, 1.0, 1.4) if op != "adjust_hue" else (-0.1, 0.03, 0.1):
        via_pil = np.asarray(getattr(TF, op)(Image.fromarray(arr), factor)).astype(int)
        via_tensor = getattr(TF, op)(tensor, factor).permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(via_pil - via_tensor)
        tail = 8 if op == "adjust_hue" else 2
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= tail, (op, factor, diff.mean(), diff.max())
