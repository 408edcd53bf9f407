"""Region scorers behind one interface, region labelling rules, and the forest file format.

Scorers turn the 93-d descriptors of one segmentation level into a saliency score per
region:

- ``HeuristicScorer`` (no training): z-scored backgroundness + 0.5 x z-scored contrast,
  times a centre prior, times (1 - share of the region's outline on the image edge).
- ``ForestScorer``: a random-forest regressor (DRFI's own regressor) fitted by
  ``maskgen drfi fit`` on pseudo labels or on ground truth.

The forest is stored as plain arrays in an ``.npz`` (loaded with ``allow_pickle=False``):
loading a model never executes code. Prediction walks every tree at once in numpy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.methods.drfi.features import BACKGROUND, CONTRAST, CUE_NAMES, N_FEATURES, RegionStats, minmax
from maskgen.methods.drfi.fusion import FUSION_KEY, check_fusion_entry
from maskgen.methods.drfi.kernels import forest_mean
from maskio.safeload import loads_json

N_CUES = len(CUE_NAMES)
FEATURE_SETS = {"drfi": N_FEATURES, "drfi+cues": N_FEATURES + N_CUES}  # name -> descriptor width

MODEL_FORMAT = "maskgen-drfi-forest-v1"
CENTER_SIGMA = 0.25
BORDER_NEGATIVE = 0.30  # pseudo label 0: >= 30 % of the region's outline on the image edge
TOP_POSITIVE = 0.20  # pseudo label 1: top 20 % of scores among regions not touching the edge
PURITY = 0.75  # ground-truth label: >= 75 % of the region's pixels fg (1) or bg (0)


class ModelError(Exception):
    """A model file that cannot be used; the message names the file and the problem."""


def _zscore(x: np.ndarray) -> np.ndarray:
    sd = x.std(axis=0)
    return np.divide(x - x.mean(axis=0), sd, out=np.zeros_like(x), where=sd > 1e-12)


class HeuristicScorer:
    name = "heuristic"
    needs_cues = False

    def params(self) -> dict[str, Any]:
        return {"scorer": self.name}

    def score(self, feats: np.ndarray, stats: RegionStats) -> np.ndarray:
        z = _zscore(feats.astype(np.float64))
        s = minmax(z[:, BACKGROUND].mean(axis=1) + 0.5 * z[:, CONTRAST].mean(axis=1))
        d2 = ((stats.centroid - 0.5) ** 2).sum(axis=1)
        return s * np.exp(-d2 / (2 * CENTER_SIGMA**2)) * (1.0 - stats.border_contact)


@dataclass
class Forest:
    """A regression forest as flat arrays; ``left[i] < 0`` marks a leaf."""

    feature: np.ndarray  # int32, per node
    threshold: np.ndarray  # float64 (sklearn compares x <= threshold in float64)
    left: np.ndarray  # int32, absolute node index or -1
    right: np.ndarray  # int32
    value: np.ndarray  # float64, the leaf prediction
    roots: np.ndarray  # int32, first node of each tree
    info: dict[str, Any] = field(default_factory=dict)  # how it was trained
    n_features: int = N_FEATURES  # 93 (DRFI's descriptor) or 99 (plus the background cues)

    @classmethod
    def from_sklearn(cls, model, info: dict[str, Any] | None = None) -> Forest:
        parts, roots, offset = [], [], 0
        for est in model.estimators_:
            t = est.tree_
            n = t.node_count
            leaf = t.children_left < 0
            parts.append((
                np.where(leaf, 0, t.feature).astype(np.int32),
                t.threshold.astype(np.float64),
                np.where(leaf, -1, t.children_left + offset).astype(np.int32),
                np.where(leaf, -1, t.children_right + offset).astype(np.int32),
                t.value[:, 0, 0].astype(np.float64),
            ))  # fmt: skip
            roots.append(offset)
            offset += n
        cat = [np.concatenate(p) for p in zip(*parts, strict=True)]
        return cls(*cat, roots=np.asarray(roots, np.int32), info=dict(info or {}),
                   n_features=int(model.n_features_in_))  # fmt: skip

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Mean of the trees' predictions for each row of ``x`` (n x ``n_features`` or wider)."""
        x = np.ascontiguousarray(np.asarray(x, np.float32), np.float64)
        # trees are validated on load (children after their parent), so every walk ends at a leaf
        return forest_mean(x, self.feature, self.threshold, self.left, self.right, self.value, self.roots)

    def save(self, path: str | Path) -> None:
        from maskio.atomic import atomic_open

        with atomic_open(path, "wb") as f:
            np.savez_compressed(
                f,
                format=np.array(MODEL_FORMAT),
                n_features=np.array(self.n_features),
                feature=self.feature,
                threshold=self.threshold,
                left=self.left,
                right=self.right,
                value=self.value,
                roots=self.roots,
                info=np.array(json.dumps(self.info, sort_keys=True)),
            )

    @classmethod
    def load(cls, path: str | Path) -> Forest:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise ModelError(f"{path}: no such model file") from None
        except Exception as exc:
            raise ModelError(f"{path}: not a readable .npz model ({type(exc).__name__}: {exc})") from None
        need = ("format", "n_features", "feature", "threshold", "left", "right", "value", "roots", "info")
        missing = [k for k in need if k not in data]
        if missing:
            raise ModelError(f"{path}: not a maskgen DRFI model (missing {', '.join(missing)})")
        if str(data["format"]) != MODEL_FORMAT:
            raise ModelError(f"{path}: model format {str(data['format'])!r}, expected {MODEL_FORMAT!r}")
        n_features = int(data["n_features"])
        if n_features not in FEATURE_SETS.values():
            widths = " or ".join(str(v) for v in FEATURE_SETS.values())
            raise ModelError(f"{path}: model expects {n_features} features, DRFI has {widths}")
        n = data["feature"].shape[0]
        arrays = [data[k] for k in ("feature", "threshold", "left", "right", "value")]
        if n == 0 or any(a.ndim != 1 or a.shape[0] != n for a in arrays):
            raise ModelError(f"{path}: node arrays are empty or of different lengths")
        idx = np.arange(n)
        inner = data["left"] >= 0
        kids_ok = (
            (data["left"][inner] > idx[inner]).all()  # children come after their parent: no cycles
            and (data["right"][inner] > idx[inner]).all()
            and (data["left"][inner] < n).all()
            and (data["right"][inner] < n).all()
            and (data["feature"][inner] >= 0).all()
            and (data["feature"][inner] < n_features).all()
        )
        roots = data["roots"]
        if not kids_ok or roots.ndim != 1 or roots.size == 0 or (roots < 0).any() or (roots >= n).any():
            raise ModelError(f"{path}: corrupt tree structure")
        if not np.isfinite(data["value"]).all():
            raise ModelError(f"{path}: non-finite leaf values")
        try:
            info = loads_json(str(data["info"]))
        except ValueError as exc:  # not JSON, or nested past the limit
            raise ModelError(f"{path}: unreadable model info ({str(exc).splitlines()[0]})") from None
        if isinstance(info, dict) and FUSION_KEY in info:
            try:
                check_fusion_entry(info[FUSION_KEY])
            except ValueError as exc:
                raise ModelError(f"{path}: {exc}") from None
        return cls(
            feature=data["feature"].astype(np.int32),
            threshold=data["threshold"].astype(np.float64),
            left=data["left"].astype(np.int32),
            right=data["right"].astype(np.int32),
            value=data["value"].astype(np.float64),
            roots=roots.astype(np.int32),
            info=info,
            n_features=n_features,
        )


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ForestScorer:
    name = "forest"

    def __init__(self, forest: Forest, source: str, sha256: str):
        self.forest = forest
        self.source = source
        self.sha256 = sha256
        self.needs_cues = forest.n_features > N_FEATURES

    @classmethod
    def from_file(cls, path: str | Path, label: str | None = None) -> ForestScorer:
        return cls(Forest.load(path), label or str(path), file_sha256(path))

    def params(self) -> dict[str, Any]:
        return {"scorer": self.name, "model": self.source, "model_sha256": self.sha256[:16]}

    def score(self, feats: np.ndarray, stats: RegionStats) -> np.ndarray:
        return self.forest.predict(feats)


class CueScorer:
    """One of the background cues as a scorer of its own: ``rbd`` (boundary connectivity and
    RBD's optimisation) or ``mr`` (manifold ranking); see ``cues``."""

    needs_cues = True

    def __init__(self, name: str):
        self.name = name
        self.column = N_FEATURES + CUE_NAMES.index(name)

    def params(self) -> dict[str, Any]:
        return {"scorer": self.name}

    def score(self, feats: np.ndarray, stats: RegionStats) -> np.ndarray:
        return feats[:, self.column].astype(np.float64)


# ------------------------------------------------------------------------- region labels


def pseudo_labels(scores: np.ndarray, stats: RegionStats) -> np.ndarray:
    """Boundary-prior pseudo labels: 1, 0, or -1 (ignored), for ``pseudo_rf`` fitting."""
    y = np.full(scores.shape, -1, np.int8)
    y[stats.border_contact >= BORDER_NEGATIVE] = 0
    inside = stats.border_contact == 0
    if inside.any():
        cut = np.quantile(scores, 1.0 - TOP_POSITIVE)
        y[inside & (scores >= cut) & (scores > 0)] = 1
    return y


def purity_labels(labels: np.ndarray, gt: np.ndarray, n_regions: int) -> np.ndarray:
    """DRFI's ground-truth labelling: >= 75 % foreground -> 1, >= 75 % background -> 0, else -1."""
    lab = labels.reshape(-1)
    area = np.bincount(lab, minlength=n_regions)
    fg = np.bincount(lab, weights=gt.reshape(-1).astype(np.float64), minlength=n_regions)
    return purity_rule(fg / np.maximum(area, 1))


def purity_rule(fg_share: np.ndarray) -> np.ndarray:
    """DRFI's labels from each region's foreground share: >= 75 % -> 1, <= 25 % -> 0, else -1."""
    y = np.full(fg_share.shape, -1, np.int8)
    y[fg_share >= PURITY] = 1
    y[fg_share <= 1.0 - PURITY] = 0
    return y
