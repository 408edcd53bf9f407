"""IoU, mIoU and the SOD metrics against slow references and pysodmetrics itself."""

from __future__ import annotations

import json

import numpy as np
import py_sod_metrics as sod
import pytest
from conftest import shared
from PIL import Image

from maskgen.metrics import MetricSums, iou


def slow_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = union = 0
    for x, y in zip(a.ravel().tolist(), b.ravel().tolist(), strict=True):
        inter += x and y
        union += x or y
    return 1.0 if union == 0 else inter / union


def slow_max_fbeta(preds: list[np.ndarray], gts: list[np.ndarray], beta2: float = 0.3) -> float:
    """Max over 256 thresholds of the mean per-image F-beta; pred min-max normalised first."""
    curves = []
    for p, g in zip(preds, gts, strict=True):
        p = p.astype(np.float64) / 255
        if p.max() != p.min():
            p = (p - p.min()) / (p.max() - p.min())
        q = (p * 255).astype(np.uint8)
        curve = []
        for t in range(255, -1, -1):  # pysodmetrics orders thresholds from high to low
            pb = q >= t
            tp = np.count_nonzero(pb & g)
            prec = tp / max(np.count_nonzero(pb), 1)
            rec = tp / max(np.count_nonzero(g), 1)
            f = 0.0 if tp == 0 else (1 + beta2) * prec * rec / (beta2 * prec + rec)
            curve.append(f)
        curves.append(curve)
    return float(np.mean(curves, axis=0).max())


def random_case(rng, h=24, w=32):
    gt = np.zeros((h, w), bool)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    gt[y : y + h // 2, x : x + w // 2] = True
    sal = np.clip(gt * 0.6 + rng.random((h, w)) * 0.5, 0, 1)
    return (sal * 255).astype(np.uint8), sal > 0.5, gt


def test_iou_matches_slow_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.random((13, 17)) > 0.5, rng.random((13, 17)) > 0.4
        assert iou(a, b) == pytest.approx(slow_iou(a, b))
    empty = np.zeros((4, 4), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, ~empty) == 0.0


def test_sums_match_pysodmetrics_and_slow_references():
    rng = np.random.default_rng(1)
    cases = [random_case(rng) for _ in range(6)]
    sums = MetricSums()
    for sal, mask, gt in cases:
        sums.add(mask, sal, gt)
    res = sums.results()

    sm, em, mae, wfm = sod.Smeasure(), sod.Emeasure(), sod.MAE(), sod.WeightedFmeasure()
    for sal, _, gt in cases:
        for m in (sm, em, mae, wfm):
            m.step(sal, gt.astype(np.uint8) * 255)
    assert res["s_measure"] == pytest.approx(sm.get_results()["sm"])
    assert res["mae"] == pytest.approx(mae.get_results()["mae"])
    assert res["e_measure"] == pytest.approx(em.get_results()["em"]["curve"].mean())
    assert res["weighted_f"] == pytest.approx(wfm.get_results()["wfm"])
    assert res["max_fbeta"] == pytest.approx(slow_max_fbeta([c[0] for c in cases], [c[2] for c in cases]))
    ious = [slow_iou(m, g) for _, m, g in cases]
    assert res["miou"] == pytest.approx(np.mean(ious))
    inter = sum(np.count_nonzero(m & g) for _, m, g in cases)
    union = sum(np.count_nonzero(m | g) for _, m, g in cases)
    assert res["dataset_iou"] == pytest.approx(inter / union)


def test_merge_and_json_round_trip_equal_one_pass():
    rng = np.random.default_rng(2)
    cases = [random_case(rng) for _ in range(6)]
    whole, a, b = MetricSums(), MetricSums(), MetricSums()
    for i, (sal, mask, gt) in enumerate(cases):
        whole.add(mask, sal, gt)
        (a if i < 2 else b).add(mask, sal, gt)
    merged = MetricSums.from_json(json.loads(json.dumps(a.to_json()))).merge(
        MetricSums.from_json(b.to_json())
    )
    for k, v in whole.results().items():
        assert merged.results()[k] == pytest.approx(v)


def test_no_ground_truth_gives_none():
    assert all(v is None for v in MetricSums().results().values())


def test_reproduces_pysodmetrics_reference_fixtures():
    """The three reference pairs shipped with PySODMetrics, and the values its releases print."""
    ref_dir = shared("pysodmetrics-reference")
    expected = json.loads((ref_dir / "version_performance.json").read_text())
    latest: dict[str, float] = {}  # later releases only list their new metrics: newest value wins
    for version in sorted(expected, key=lambda v: [int(x) for x in v[1:].split("_")]):
        latest.update(expected[version])
    sums = MetricSums()
    for mask_path in sorted((ref_dir / "masks").glob("*.png")):
        gt = np.asarray(Image.open(mask_path).convert("L")) > 128
        pred = np.asarray(Image.open(ref_dir / "preds" / mask_path.name).convert("L"))
        sums.add(pred > 127, pred, gt)
    res = sums.results()
    assert res["s_measure"] == pytest.approx(latest["Smeasure"], abs=1e-6)
    assert res["mae"] == pytest.approx(latest["MAE"], abs=1e-9)
    assert res["max_fbeta"] == pytest.approx(latest["maxFm"], abs=1e-9)
    assert res["mean_fbeta"] == pytest.approx(latest["meanFm"], abs=1e-9)
    assert res["e_measure"] == pytest.approx(latest["meanEm"], abs=1e-9)
    assert res["max_e_measure"] == pytest.approx(latest["maxEm"], abs=1e-9)
    assert res["weighted_f"] == pytest.approx(latest["wFmeasure"], abs=1e-9)


def test_ground_truth_is_fitted_to_the_image_by_nearest_neighbour():
    from maskgen.groundtruth import fit_to_shape

    gt = np.random.default_rng(0).random((4, 6)) > 0.5
    assert fit_to_shape(gt, (4, 6)) is gt
    up = fit_to_shape(gt, (8, 12))
    slow = np.array([[gt[y * 4 // 8, x * 6 // 12] for x in range(12)] for y in range(8)])
    assert up.dtype == bool
    np.testing.assert_array_equal(up, slow)
