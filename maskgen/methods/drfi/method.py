"""``--method drfi``: DRFI-style saliency (segment, describe regions, score, fuse levels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.methods.base import Resources, SaliencyMethod
from maskgen.methods.drfi.features import pixel_features, region_features
from maskgen.methods.drfi.refine import LevelGraph
from maskgen.methods.drfi.scoring import ForestScorer, HeuristicScorer, minmax
from maskgen.methods.drfi.segment import LEVEL_SETS, resolve_backend, segment

DEFAULT_MODEL = Path(__file__).parent / "default_forest.npz"
ENHANCE = 1.25  # DRFI's per-level contrast enhancement exp(1.25 s)


def enhanced(scores: np.ndarray) -> np.ndarray:
    """DRFI's per-level contrast enhancement of region scores: min-max, exp(1.25 s), min-max."""
    return minmax(np.exp(ENHANCE * minmax(np.asarray(scores, np.float64))))


def level_map(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """DRFI's per-level map: the enhanced scores painted onto the regions."""
    return enhanced(scores)[labels].astype(np.float32)


def level_values(scores: list[np.ndarray]) -> np.ndarray:
    """One level's region values for refinement: each scorer's enhanced scores, averaged, min-max."""
    return minmax(np.mean([enhanced(s) for s in scores], axis=0))


def fuse(maps: list[np.ndarray]) -> np.ndarray:
    """Uniform fusion over levels (DRFI: "the uniform weight performs well"), then min-max."""
    return minmax(np.mean(maps, axis=0)).astype(np.float32)


SCORERS = ("forest", "heuristic", "forest+heuristic")


def make_scorers(scorer: str, model: str | None) -> list:
    """``forest``, ``heuristic``, or ``forest+heuristic`` (both maps averaged per level)."""
    if scorer not in SCORERS:
        raise ValueError(f"drfi: scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    if scorer == "heuristic" and model:
        raise ValueError("drfi: model= needs a forest scorer")
    out: list = []
    if "forest" in scorer:
        if model in (None, "", "default"):
            out.append(ForestScorer.from_file(DEFAULT_MODEL, label="default"))
        else:
            out.append(ForestScorer.from_file(model))
    if "heuristic" in scorer:
        out.append(HeuristicScorer())
    return out


class DRFI(SaliencyMethod):
    name = "drfi"
    resources = Resources(num_cpus=1)
    batch_size = 8

    def __init__(
        self,
        scorer: str = "forest",
        model: str | None = None,
        levels: str = "harl",
        sigma: float | None = None,
        k: float | None = None,
        min_size: int | None = None,
        refine: bool | int = False,
        backend: str | None = None,
    ):
        if levels not in LEVEL_SETS:
            raise ValueError(f"drfi: levels must be one of {', '.join(LEVEL_SETS)}, got {levels!r}")
        self.levels_name = levels
        self.levels = list(LEVEL_SETS[levels])
        if any(v is not None for v in (sigma, k, min_size)):
            if levels != "harl":
                raise ValueError("drfi: sigma/k/min_size override the single HARL level only")
            s0, k0, m0 = self.levels[0]
            self.levels = [(float(sigma or s0), float(k or k0), int(min_size or m0))]
        self.scorer_name = scorer
        self.scorers = make_scorers(scorer, model)
        self.refine = bool(refine)
        self.backend = resolve_backend(backend, "drfi")

    @classmethod
    def canonical_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        out = dict(args)
        if out.get("model") not in (None, "", "default"):
            out["model"] = str(Path(out["model"]).expanduser().resolve())
        return out

    @property
    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"scorer": self.scorer_name}
        for sc in self.scorers:
            params.update({k: v for k, v in sc.params().items() if k != "scorer"})
        params.update(
            levels=self.levels_name,
            segmentations=[list(lv) for lv in self.levels],
            refine=self.refine,
            backend=self.backend,
        )
        return params

    def saliency(self, rgb: np.ndarray) -> np.ndarray:
        pix = pixel_features(rgb)
        labels, scores, stats = [], [], []
        for sigma, k, min_size in self.levels:
            lab = segment(rgb, sigma, k, min_size, self.backend)
            feats, st = region_features(pix, lab)
            labels.append(lab)
            stats.append(st)
            scores.append([sc.score(feats, st) for sc in self.scorers])
        if self.refine and max(st.area.size for st in stats) > 1:
            graph = LevelGraph.build(pix, labels, stats)
            refined = graph.refine([level_values(s) for s in scores])
            return refined[labels[graph.finest]].astype(np.float32)
        return fuse([level_map(s, lab) for ss, lab in zip(scores, labels, strict=True) for s in ss])

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.saliency(im) for im in images]
