"""``maskgen drfi fit``: fit DRFI's region regressor on a dataset.

Labels per region come either from ground truth (DRFI's purity rule: >= 75 % of the
region's pixels foreground -> 1, >= 75 % background -> 0, else unused) or, without ground
truth, from the boundary prior (``pseudo_labels``: regions mostly on the image edge -> 0,
the best-scored inner regions -> 1). Self-training rounds re-label and fit again, in one of
two ways (``round_labels``):

- ``boundary``: the boundary-prior rule again, on the fitted forest's region scores;
- ``masks``: the masks the method itself would make with the fitted forest (``scorer=
  forest+heuristic levels=<levels> refine=1``, thresholded at 0.5), turned into region labels
  by DRFI's purity rule, exactly as ground-truth masks are. The labels then follow object
  outlines instead of the border/centre rule (what it gains is measured in the README).

Classes are balanced before fitting, as in DRFI.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from maskgen.imaging import ImageDecodeError, decode_image
from maskgen.methods.drfi.features import RegionStats, pixel_features
from maskgen.methods.drfi.fusion import FUSION_KEY, fusion_info, fusion_rows, simplex_least_squares
from maskgen.methods.drfi.method import describe_level, level_values
from maskgen.methods.drfi.refine import LevelGraph
from maskgen.methods.drfi.scoring import (
    FEATURE_SETS,
    Forest,
    ForestScorer,
    HeuristicScorer,
    pseudo_labels,
    purity_labels,
    purity_rule,
)
from maskgen.methods.drfi.segment import DEFAULT_BACKEND, LEVEL_SETS, segment_levels
from maskgen.sources import Source

# RandomForestRegressor settings of docs/methods.md §2.1 (DRFI: 200 trees, mtry 15)
FOREST_DEFAULTS = {"n_estimators": 200, "max_features": 15, "min_samples_leaf": 5}


ROUND_LABELS = ("boundary", "masks")


@dataclass
class _Level:
    feats: np.ndarray
    stats: RegionStats
    gt_labels: np.ndarray | None


@dataclass
class _Image:
    levels: list[_Level]
    graph: LevelGraph | None  # for labels from the method's own masks, and for fusion
    gt_finest: np.ndarray | None = None  # each finest region's ground-truth foreground share


def extract_levels(
    source: Source, items, levels: str, need_gt: bool, log: TextIO, need_graph: bool = False,
    cues: bool = False,
) -> tuple[list[_Image], int]:  # fmt: skip
    """Region descriptors of every level of every usable image (bad images are skipped)."""
    out, skipped = [], 0
    t0 = time.time()
    for n, item in enumerate(items, 1):
        try:
            rgb = decode_image(source.read(item)).rgb
        except (OSError, ImageDecodeError):
            skipped += 1
            continue
        try:
            gt = source.ground_truth(item) if need_gt else None
        except (OSError, ImageDecodeError):  # an unreadable or bomb mask: skipped, as a bad image is
            gt = None
        if need_gt and (gt is None or gt.shape != rgb.shape[:2]):
            skipped += 1
            continue
        pix = pixel_features(rgb)
        image, segmentations = _Image([], None), []
        for labels in segment_levels(rgb, LEVEL_SETS[levels]):
            feats, stats = describe_level(pix, labels, cues)
            gl = purity_labels(labels, gt, feats.shape[0]) if gt is not None else None
            image.levels.append(_Level(feats, stats, gl))
            segmentations.append(labels)
        if need_graph:
            image.graph = LevelGraph.build(pix, segmentations, [lv.stats for lv in image.levels])
            if gt is not None:
                finest = image.graph.finest
                fg = np.bincount(segmentations[finest].reshape(-1), gt.reshape(-1).astype(np.float64),
                                 image.graph.areas[finest].size)  # fmt: skip
                image.gt_finest = fg / image.graph.areas[finest]
        out.append(image)
        if n % 50 == 0:
            print(f"drfi fit: described {n}/{len(items)} images ({time.time() - t0:.0f} s)", file=log)
    return out, skipped


def _balanced(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    keep = y >= 0
    x, y = x[keep], y[keep]
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"drfi fit: need both foreground and background regions (got {pos.size} and {neg.size})"
        )
    m = min(pos.size, neg.size)
    idx = np.sort(np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)]))
    return x[idx], y[idx].astype(np.float64)


def fit_forest(
    x: np.ndarray, y: np.ndarray, seed: int, info: dict[str, Any], jobs: int = 1, **forest_kw: Any
) -> Forest:
    """A scikit-learn forest, packed; ``jobs`` threads build the trees (same trees for any count)."""
    from sklearn.ensemble import RandomForestRegressor

    kw = {**FOREST_DEFAULTS, **forest_kw}
    kw["max_features"] = min(kw["max_features"], x.shape[1])
    model = RandomForestRegressor(random_state=seed, n_jobs=jobs, **kw)
    model.fit(x, y)
    return Forest.from_sklearn(model, info={**info, "forest": kw, "n_train_regions": int(x.shape[0])})


def mask_labels(image: _Image, scorers: list) -> list[np.ndarray]:
    """Region labels of every level from the method's own refined mask (DRFI's purity rule)."""
    assert image.graph is not None
    values = [level_values([sc.score(lv.feats, lv.stats) for sc in scorers]) for lv in image.levels]
    fg = (image.graph.refine(values) >= 0.5).astype(np.float64)
    return [purity_rule(share) for share in image.graph.share_on_levels(fg)]


def fit_fusion(images: list[_Image], seed: int, jobs: int, **forest_kw: Any) -> np.ndarray:
    """Level weights for ``refine=1`` (fusion.py), cross-fitted: the photos are split in two
    (alternate photos), each half's levels are scored by a forest fitted on the other half's
    regions, and one simplex-constrained least-squares fit runs over all photos."""
    rng = np.random.default_rng(seed + 7919)  # its own stream: the model's forest is unchanged
    rows = []
    halves = [images[0::2], images[1::2]]
    for train, held in ((halves[0], halves[1]), (halves[1], halves[0])):
        data = [lv for im in train for lv in im.levels]
        x, y = _balanced(
            np.concatenate([d.feats for d in data]), np.concatenate([d.gt_labels for d in data]), rng
        )
        scorer = ForestScorer(fit_forest(x, y, seed, {}, jobs, **forest_kw), "half", "")
        for im in held:
            assert im.graph is not None and im.gt_finest is not None
            values = [level_values([scorer.score(lv.feats, lv.stats)]) for lv in im.levels]
            area = im.graph.areas[im.graph.finest]
            rows.append(fusion_rows([p / area for p in im.graph.pooled_levels(values)], area, im.gt_finest))
    x, y, w = (np.concatenate(parts) for parts in zip(*rows, strict=True))
    return simplex_least_squares(x, y, w)


def _check_fit_choices(labels: str, levels: str, features: str, round_labels: str, fusion: str) -> None:
    if features not in FEATURE_SETS:
        raise ValueError(f"drfi fit: features must be one of {', '.join(FEATURE_SETS)}, got {features!r}")
    if labels not in ("pseudo", "gt"):
        raise ValueError(f"drfi fit: labels must be 'pseudo' or 'gt', got {labels!r}")
    if round_labels not in ROUND_LABELS:
        raise ValueError(
            f"drfi fit: round labels must be one of {', '.join(ROUND_LABELS)}, got {round_labels!r}"
        )
    if fusion not in ("uniform", "learned"):
        raise ValueError(f"drfi fit: fusion must be 'uniform' or 'learned', got {fusion!r}")
    if fusion == "learned" and (labels != "gt" or len(LEVEL_SETS[levels]) < 2):
        raise ValueError("drfi fit: --fusion learned needs ground truth (--labels gt) and two or more levels")


def fit_drfi(
    source: Source,
    source_name: str,
    *,
    labels: str = "pseudo",
    levels: str = "harl",
    features: str = "drfi+cues",
    rounds: int = 0,
    round_labels: str = "boundary",
    limit: int | None = None,
    seed: int = 0,
    log: TextIO | None = None,
    jobs: int = 1,
    fusion: str = "uniform",
    **forest_kw: Any,
) -> Forest:
    """Fit a forest on ``source``; ``labels`` is 'pseudo' or 'gt'; ``features`` 'drfi' (DRFI's
    93-d descriptor) or 'drfi+cues' (plus the 6 background cues of ``cues``); ``fusion``
    'learned' (ground truth only) also fits the levels' weights for ``refine=1``."""
    log = log or sys.stderr
    _check_fit_choices(labels, levels, features, round_labels, fusion)
    by_masks = labels == "pseudo" and rounds > 0 and round_labels == "masks"
    items = source.list_items()[:limit] if limit else source.list_items()
    images, skipped = extract_levels(
        source, items, levels, labels == "gt", log, need_graph=by_masks or fusion == "learned",
        cues=features == "drfi+cues",
    )  # fmt: skip
    if not images:
        raise ValueError("drfi fit: no usable images" + (" with ground truth" if labels == "gt" else ""))
    data = [lv for im in images for lv in im.levels]
    rng = np.random.default_rng(seed)
    x_all = np.concatenate([d.feats for d in data])
    info = {
        "source": source_name,
        "source_config": source.config(),
        "images": len(items) - skipped,
        "labels": labels,
        "levels": levels,
        "features": features,
        "rounds": rounds,
        **({"round_labels": round_labels} if rounds > 0 and labels == "pseudo" else {}),
        "seed": seed,
        "segmentation_backend": DEFAULT_BACKEND,
    }
    if labels == "gt":
        y_all = np.concatenate([d.gt_labels for d in data])
        x, y = _balanced(x_all, y_all, rng)
        forest = fit_forest(x, y, seed, info, jobs, **forest_kw)
        if fusion == "learned":
            weights = fit_fusion(images, seed, jobs, **forest_kw)
            forest.info[FUSION_KEY] = fusion_info(levels, True, weights, len(images))
            print(
                f"drfi fit: fusion weights {np.round(weights, 3).tolist()} ({len(images)} photos)", file=log
            )
        return forest

    scorer: HeuristicScorer | ForestScorer = HeuristicScorer()
    forest = None
    for r in range(rounds + 1):
        if r > 0 and by_masks:
            scorers = [scorer, HeuristicScorer()]
            y_all = np.concatenate([y for im in images for y in mask_labels(im, scorers)])
        else:
            y_all = np.concatenate([pseudo_labels(scorer.score(d.feats, d.stats), d.stats) for d in data])
        x, y = _balanced(x_all, y_all, rng)
        forest = fit_forest(x, y, seed + r, {**info, "round": r}, jobs, **forest_kw)
        print(f"drfi fit: round {r}: {x.shape[0]} balanced regions", file=log)
        scorer = ForestScorer(forest, "round", "")
    assert forest is not None
    return forest
