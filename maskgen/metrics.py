"""Mask-quality metrics: IoU / mIoU and the salient-object set (via pysodmetrics).

Everything is kept as *sums* (``MetricSums``) so that each shard can compute its own part,
store it in its stats file, and the dataset-level numbers come from adding the shards up,
whatever order they finished in and whether the build was resumed.

Conventions follow PySODMetrics: the prediction is a uint8 saliency map (min-max
normalised inside the library), ground truth is binarised, F-beta uses beta² = 0.3, the
max F-beta is the maximum of the dataset-mean F curve over 256 thresholds, E-measure is
the mean of the dataset-mean curve, S-measure uses alpha = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import py_sod_metrics as sod

N_THRESHOLDS = 256
FBETA_SQUARED = 0.3


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    inter = np.count_nonzero(pred & gt)
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else inter / union


class _SodPerImage:
    """Per-image SOD metric values from pysodmetrics' own classes (one instance, reused)."""

    def __init__(self) -> None:
        self._fm = sod.FmeasureV2(
            {"fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=False, beta=FBETA_SQUARED)}
        )
        self._sm = sod.Smeasure()
        self._em = sod.Emeasure()
        self._mae = sod.MAE()
        self._wfm = sod.WeightedFmeasure()

    def __call__(self, pred_u8: np.ndarray, gt_u8: np.ndarray) -> dict[str, Any]:
        self._fm.step(pred_u8, gt_u8)
        self._sm.step(pred_u8, gt_u8)
        self._em.step(pred_u8, gt_u8)
        self._mae.step(pred_u8, gt_u8)
        self._wfm.step(pred_u8, gt_u8)
        out = {
            "fm_curve": np.asarray(self._fm._metric_handlers["fm"].dynamic_results.pop(), np.float64),
            "s_measure": float(self._sm.sms.pop()),
            "em_curve": np.asarray(self._em.changeable_ems.pop(), np.float64),
            "mae": float(self._mae.maes.pop()),
            "weighted_f": float(self._wfm.weighted_fms.pop()),
        }
        self._em.adaptive_ems.pop()
        return out


@dataclass
class MetricSums:
    """Additive statistics over the images that have ground truth."""

    n: int = 0
    iou_sum: float = 0.0
    intersection: int = 0
    union: int = 0
    mae_sum: float = 0.0
    s_measure_sum: float = 0.0
    weighted_f_sum: float = 0.0
    fm_curve_sum: np.ndarray = field(default_factory=lambda: np.zeros(N_THRESHOLDS))
    em_curve_sum: np.ndarray = field(default_factory=lambda: np.zeros(N_THRESHOLDS))
    _sod: _SodPerImage | None = field(default=None, repr=False, compare=False)

    def add(self, mask: np.ndarray, saliency_u8: np.ndarray, gt: np.ndarray) -> float:
        """Add one image (bool mask, uint8 soft map, bool GT); returns its IoU."""
        if self._sod is None:
            self._sod = _SodPerImage()
        v = iou(mask, gt)
        self.n += 1
        self.iou_sum += v
        self.intersection += int(np.count_nonzero(mask & gt))
        self.union += int(np.count_nonzero(mask | gt))
        per = self._sod(saliency_u8, gt.astype(np.uint8) * 255)
        self.mae_sum += per["mae"]
        self.s_measure_sum += per["s_measure"]
        self.weighted_f_sum += per["weighted_f"]
        self.fm_curve_sum += per["fm_curve"]
        self.em_curve_sum += per["em_curve"]
        return v

    def merge(self, other: MetricSums) -> MetricSums:
        self.n += other.n
        self.iou_sum += other.iou_sum
        self.intersection += other.intersection
        self.union += other.union
        self.mae_sum += other.mae_sum
        self.s_measure_sum += other.s_measure_sum
        self.weighted_f_sum += other.weighted_f_sum
        self.fm_curve_sum = self.fm_curve_sum + other.fm_curve_sum
        self.em_curve_sum = self.em_curve_sum + other.em_curve_sum
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "iou_sum": self.iou_sum,
            "intersection": self.intersection,
            "union": self.union,
            "mae_sum": self.mae_sum,
            "s_measure_sum": self.s_measure_sum,
            "weighted_f_sum": self.weighted_f_sum,
            "fm_curve_sum": [float(x) for x in self.fm_curve_sum],
            "em_curve_sum": [float(x) for x in self.em_curve_sum],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MetricSums:
        return cls(
            n=int(d["n"]),
            iou_sum=float(d["iou_sum"]),
            intersection=int(d["intersection"]),
            union=int(d["union"]),
            mae_sum=float(d["mae_sum"]),
            s_measure_sum=float(d["s_measure_sum"]),
            weighted_f_sum=float(d["weighted_f_sum"]),
            fm_curve_sum=np.asarray(d["fm_curve_sum"], np.float64),
            em_curve_sum=np.asarray(d["em_curve_sum"], np.float64),
        )

    def results(self) -> dict[str, float | None]:
        """Dataset-level metrics (None when no image had ground truth)."""
        if self.n == 0:
            keys = ("miou", "dataset_iou", "mae", "max_fbeta", "mean_fbeta", "s_measure", "e_measure",
                    "max_e_measure", "weighted_f")  # fmt: skip
            return dict.fromkeys(keys)
        fm = self.fm_curve_sum / self.n
        em = self.em_curve_sum / self.n
        return {
            "miou": self.iou_sum / self.n,
            "dataset_iou": self.intersection / self.union if self.union else 1.0,
            "mae": self.mae_sum / self.n,
            "max_fbeta": float(fm.max()),
            "mean_fbeta": float(fm.mean()),
            "s_measure": self.s_measure_sum / self.n,
            "e_measure": float(em.mean()),
            "max_e_measure": float(em.max()),
            "weighted_f": self.weighted_f_sum / self.n,
        }
