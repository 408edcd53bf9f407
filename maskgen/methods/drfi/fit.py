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


@dataclass(frozen=True)
class FitRecipe:
    """What ``maskgen drfi fit`` fits: ``labels`` 'pseudo' or 'gt'; ``levels`` a LEVEL_SETS
    name; ``features`` 'drfi' (DRFI's 93-d descriptor) or 'drfi+cues' (plus the 6 background
    cues of ``cues``); ``rounds`` of self-training on ``round_labels``; ``fusion`` 'learned'
    (ground truth only) also fits the levels' weights for ``refine=1``; the first ``limit``
    images; ``seed`` for balancing and the trees."""

    labels: str = "pseudo"
    levels: str = "harl"
    features: str = "drfi+cues"
    rounds: int = 0
    round_labels: str = "boundary"
    fusion: str = "uniform"
    limit: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.features not in FEATURE_SETS:
            raise ValueError(
                f"drfi fit: features must be one of {', '.join(FEATURE_SETS)}, got {self.features!r}"
            )
        if self.labels not in ("pseudo", "gt"):
            raise ValueError(f"drfi fit: labels must be 'pseudo' or 'gt', got {self.labels!r}")
        if self.round_labels not in ROUND_LABELS:
            raise ValueError(
                f"drfi fit: round labels must be one of {', '.join(ROUND_LABELS)}, got {self.round_labels!r}"
            )
        if self.fusion not in ("uniform", "learned"):
            raise ValueError(f"drfi fit: fusion must be 'uniform' or 'learned', got {self.fusion!r}")
        if self.fusion == "learned" and (self.labels != "gt" or len(LEVEL_SETS[self.levels]) < 2):
            raise ValueError(
                "drfi fit: --fusion learned needs ground truth (--labels gt) and two or more levels"
            )

    @property
    def rounds_on_masks(self) -> bool:
        """Later rounds label regions by the previous round's whole masks (not its boundary)."""
        return self.labels == "pseudo" and self.rounds > 0 and self.round_labels == "masks"

    def info(self) -> dict[str, Any]:
        """What the fitted model records of its recipe."""
        out = {"labels": self.labels, "levels": self.levels, "features": self.features, "rounds": self.rounds}
        if self.rounds > 0 and self.labels == "pseudo":
            out["round_labels"] = self.round_labels
        return {**out, "seed": self.seed}


def fit_drfi(
    source: Source,
    source_name: str,
    recipe: FitRecipe = FitRecipe(),
    *,
    log: TextIO | None = None,
    jobs: int = 1,
    **forest_kw: Any,
) -> Forest:
    """Fit a forest on ``source`` by ``recipe``; ``forest_kw`` go to the trees (``n_estimators``,
    ``min_samples_leaf``); ``jobs`` threads build them (the forest is the same for any count)."""
    log = log or sys.stderr
    items = source.list_items()[: recipe.limit] if recipe.limit else source.list_items()
    gt = recipe.labels == "gt"
    images, skipped = extract_levels(
        source, items, recipe.levels, gt, log, need_graph=recipe.rounds_on_masks or recipe.fusion == "learned",
        cues=recipe.features == "drfi+cues",
    )  # fmt: skip
    if not images:
        raise ValueError("drfi fit: no usable images" + (" with ground truth" if gt else ""))
    info = {"source": source_name, "source_config": source.config(), "images": len(items) - skipped,
            **recipe.info(), "segmentation_backend": DEFAULT_BACKEND}  # fmt: skip
    fit = _fit_on_ground_truth if gt else _fit_self_trained
    return fit(images, recipe, info, log, jobs, forest_kw)


def _fit_on_ground_truth(
    images, recipe: FitRecipe, info: dict, log: TextIO, jobs: int, forest_kw: dict
) -> Forest:
    """One forest on the regions' ground-truth labels (and, with ``fusion: learned``, the
    levels' weights, cross-fitted)."""
    data = [lv for im in images for lv in im.levels]
    x, y = _balanced(np.concatenate([d.feats for d in data]), np.concatenate([d.gt_labels for d in data]),
                     np.random.default_rng(recipe.seed))  # fmt: skip
    forest = fit_forest(x, y, recipe.seed, info, jobs, **forest_kw)
    if recipe.fusion == "learned":
        weights = fit_fusion(images, recipe.seed, jobs, **forest_kw)
        forest.info[FUSION_KEY] = fusion_info(recipe.levels, True, weights, len(images))
        print(f"drfi fit: fusion weights {np.round(weights, 3).tolist()} ({len(images)} photos)", file=log)
    return forest


def _fit_self_trained(
    images, recipe: FitRecipe, info: dict, log: TextIO, jobs: int, forest_kw: dict
) -> Forest:
    """Round 0 on the boundary-prior heuristic's pseudo labels, then ``rounds`` more, each on
    the labels of the previous round's forest (its boundary, or its whole masks)."""
    data = [lv for im in images for lv in im.levels]
    rng = np.random.default_rng(recipe.seed)
    x_all = np.concatenate([d.feats for d in data])
    scorer: HeuristicScorer | ForestScorer = HeuristicScorer()
    forest = None
    for r in range(recipe.rounds + 1):
        if r > 0 and recipe.rounds_on_masks:
            scorers = [scorer, HeuristicScorer()]
            y_all = np.concatenate([y for im in images for y in mask_labels(im, scorers)])
        else:
            y_all = np.concatenate([pseudo_labels(scorer.score(d.feats, d.stats), d.stats) for d in data])
        x, y = _balanced(x_all, y_all, rng)
        forest = fit_forest(x, y, recipe.seed + r, {**info, "round": r}, jobs, **forest_kw)
        print(f"drfi fit: round {r}: {x.shape[0]} balanced regions", file=log)
        scorer = ForestScorer(forest, "round", "")
    assert forest is not None
    return forest
