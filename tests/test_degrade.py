"""Masks of controlled quality (issue 41 item 2) and the exact mode of ``--method gt`` (issue
42 item 8): degraded masks land on the target IoU, their errors are regions, not pixels, the
same seed gives the same masks, and the build's report measures what was asked for."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from maskgen.cli import main
from maskgen.methods import make_method
from maskgen.methods.degrade import TOLERANCE, degrade
from maskgen.sources.synthetic import render_scene

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-seg"


def slow_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU counted pixel by pixel (independent of the module's vectorised one)."""
    inter = union = 0
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
        inter += x and y
        union += x or y
    return inter / union


def scene(i: int) -> tuple[np.ndarray, np.ndarray]:
    rgb, mask, _ = render_scene(3, i)
    return rgb, mask.astype(bool)


@pytest.mark.parametrize("quality", [0.95, 0.8, 0.6, 0.5])
def test_degraded_masks_land_on_the_target_iou(quality):
    for i in range(6):
        rgb, truth = scene(i)
        got = slow_iou(degrade(truth, rgb, quality, seed=0), truth)
        assert abs(got - quality) <= TOLERANCE + 0.01, (i, got)


def test_errors_are_regions_not_pixel_noise():
    rgb, truth = scene(1)
    wrong = (degrade(truth, rgb, 0.6, seed=0) ^ truth).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(wrong, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    assert wrong.sum() > 0.1 * truth.sum()
    # most of the wrong pixels sit in a few large pieces, not in scattered specks
    assert np.sort(areas)[::-1][:5].sum() >= 0.8 * wrong.sum(), sorted(areas)[-10:]


def test_same_seed_same_mask_other_seed_other_mask():
    rgb, truth = scene(2)
    a, b = degrade(truth, rgb, 0.7, seed=0), degrade(truth, rgb, 0.7, seed=0)
    c = degrade(truth, rgb, 0.7, seed=1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_quality_one_and_empty_truth_are_kept():
    rgb, truth = scene(0)
    np.testing.assert_array_equal(degrade(truth, rgb, 1.0), truth)
    empty = np.zeros_like(truth)
    np.testing.assert_array_equal(degrade(empty, rgb, 0.5), empty)


@pytest.mark.skipif(not CALTECH.is_dir(), reason="../shared/data/caltech101-seg not present")
def test_degraded_caltech_masks_average_to_the_target():
    """Real photos with exact outlines: the mean IoU is within 0.03 of each target."""
    photos = sorted((CALTECH / "val").glob("*/*.jpg"))[::25][:20]
    for quality in (0.9, 0.7, 0.5):
        ious = []
        for photo in photos:
            rgb = np.asarray(Image.open(photo).convert("RGB"))
            mask = CALTECH / "masks" / "val" / photo.parent.name / f"{photo.stem}.png"
            truth = np.asarray(Image.open(mask).convert("L")) > 127
            ious.append(slow_iou(degrade(truth, rgb, quality, seed=0), truth))
        assert abs(np.mean(ious) - quality) <= 0.03, (quality, np.mean(ious))


def write_scenes(tmp_path: Path, n: int, tiny_at: int | None = None) -> tuple[Path, Path]:
    root, gt = tmp_path / "img", tmp_path / "gt"
    root.mkdir()
    gt.mkdir()
    for i in range(n):
        rgb, mask = scene(i)
        if i == tiny_at:  # a mask under 1 % of the image: the default replaces it by the centre prior
            mask = np.zeros_like(mask)
            mask[10:14, 10:14] = True
        Image.fromarray(rgb).save(root / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{i}.png")
    return root, gt


def build(root: Path, gt: Path, out: Path, *params: str) -> dict:
    args = ["build", "--source", "folder", "--root", str(root), "--gt", str(gt), "--method", "gt",
            "--out", str(out), "--executor", "local", "--no-progress"]  # fmt: skip
    for p in params:
        args += ["--param", p]
    assert main(args) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_build_with_quality_reports_the_target_miou(tmp_path):
    root, gt = write_scenes(tmp_path, 8)
    report = build(root, gt, tmp_path / "q7", "quality=0.7", "seed=3")
    assert abs(report["miou"] - 0.7) <= 0.03, report["miou"]
    again = build(root, gt, tmp_path / "q7b", "quality=0.7", "seed=3")
    assert again["miou"] == report["miou"]
    manifest = json.loads((tmp_path / "q7" / "manifest.json").read_text())
    assert manifest["method_params"] == {"exact": True, "quality": 0.7, "seed": 3}


@pytest.mark.slow
def test_exact_mode_keeps_what_the_default_replaces(tmp_path):
    """The default passes masks through the shared post-processing (a mask under 1 % becomes
    the centre prior); ``exact=true`` keeps every mask as it is."""
    root, gt = write_scenes(tmp_path, 3, tiny_at=1)
    default = build(root, gt, tmp_path / "default")
    exact = build(root, gt, tmp_path / "exact", "exact=true")
    assert default["miou"] < 1.0 and exact["miou"] == 1.0
    manifest = json.loads((tmp_path / "default" / "manifest.json").read_text())
    assert manifest["method_params"] == {}  # builds from before the option keep their fingerprint


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"quality": 0}, "quality=0: must be a number in (0, 1]"),
        ({"quality": 1.5}, "quality=1.5: must be a number in (0, 1]"),
        ({"quality": "high"}, "quality=high: must be a number"),
        ({"seed": 2}, "only with --param quality"),
        ({"exact": "yes"}, "exact=yes: must be true or false"),
        ({"quality": 0.7, "seed": -1}, "seed=-1: must be an integer in [0, 4294967295]"),
        ({"shape": "circle"}, "--param shape='circle': must be one of mask, box"),
        ({"shape": "box", "quality": 0.7}, "shape=box: not with --param quality"),
    ],
)
def test_bad_gt_params_are_one_line(params, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        make_method("gt", params)
    assert "\n" not in str(info.value)


def slow_object_boxes(mask: np.ndarray) -> np.ndarray:
    """Each 8-connected component's bounding box, by a flood fill written here."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    out = np.zeros((h, w), np.uint8)
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            stack, ys, xs = [(y0, x0)], [], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                ys.append(y)
                xs.append(x)
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                            seen[v, u] = True
                            stack.append((v, u))
            out[min(ys) : max(ys) + 1, min(xs) : max(xs) + 1] = 1
    return out


def test_box_shape_fills_each_object_to_its_box():
    """``shape=box``: the mask a box per object gives (issue 41's box arm), checked against a
    flood fill; two objects stay two boxes, diagonal neighbours are one object."""
    from maskgen.methods.truth import object_boxes

    mask = np.zeros((20, 30), bool)
    mask[2:6, 3:5] = True
    mask[6, 5] = True  # touches the first by a corner: one object
    mask[10:18, 20:22] = mask[12, 15:25] = True  # a cross: its box is wider than either bar
    boxes = object_boxes(mask)
    np.testing.assert_array_equal(boxes, slow_object_boxes(mask))
    assert boxes[2:7, 3:6].all() and boxes[10:18, 15:25].all() and boxes.sum() == 5 * 3 + 8 * 10
    for i in range(4):
        rgb, truth = scene(i)
        method = make_method("gt", {"shape": "box"})
        (box,) = method.predict_with_truth([rgb], [truth.astype(np.uint8)])
        np.testing.assert_array_equal(box, slow_object_boxes(truth))
        assert (box >= truth).all() and method.exact_masks
    assert make_method("gt", {"shape": "box"}).params == {"exact": True, "shape": "box"}
    assert make_method("gt", {}).params == {}  # the default's fingerprint is unchanged
