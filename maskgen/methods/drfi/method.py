"""``--method drfi``: DRFI-style saliency (segment, describe regions, score, fuse levels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.methods.base import Resources, SaliencyMethod, param_choice, param_number
from maskgen.methods.drfi.cues import region_cues
from maskgen.methods.drfi.features import PixelFeatures, RegionStats, minmax, pixel_features, region_features
from maskgen.methods.drfi.fusion import fusion_weights
from maskgen.methods.drfi.refine import LevelGraph
from maskgen.methods.drfi.scoring import CueScorer, ForestScorer, HeuristicScorer
from maskgen.methods.drfi.segment import LEVEL_SETS, resolve_backend, segment_levels
from maskio.shard_format import MAX_PIXELS

# Shipped forests, by the name ``--param model=`` takes: ``default`` was fitted with ground truth
# (docs/drfi.md says on what), ``unsupervised`` without any human label (pseudo labels on the
# package's own synthetic scenes)
SHIPPED_MODELS = {
    "default": Path(__file__).parent / "default_forest.npz",
    "unsupervised": Path(__file__).parent / "unsupervised_forest.npz",
}
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


SCORERS = ("forest", "heuristic", "rbd", "mr")
FUSIONS = ("auto", "uniform", "learned")


def make_scorers(scorer: str, model: str | None) -> list:
    """One scorer or several joined by ``+`` (their maps averaged per level): ``forest``,
    ``heuristic``, ``rbd`` (boundary connectivity), ``mr`` (manifold ranking)."""
    names = scorer.split("+") if isinstance(scorer, str) else []
    if not names or any(n not in SCORERS for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"drfi: scorer must be one of {', '.join(SCORERS)} or several joined by '+', got {scorer!r}"
        )
    if "forest" not in names and model:
        raise ValueError("drfi: model= needs a forest scorer")
    out: list = []
    for name in names:
        if name == "forest":
            model = model or "default"
            if model in SHIPPED_MODELS:
                out.append(ForestScorer.from_file(SHIPPED_MODELS[model], label=model))
            else:
                out.append(ForestScorer.from_file(model))
        elif name == "heuristic":
            out.append(HeuristicScorer())
        else:
            out.append(CueScorer(name))
    return out


def describe_level(pix: PixelFeatures, labels: np.ndarray, cues: bool) -> tuple[np.ndarray, RegionStats]:
    """One level's region descriptors: DRFI's 93, plus the 6 background cues when ``cues``."""
    feats, stats = region_features(pix, labels)
    if cues:
        feats = np.concatenate([feats, region_cues(stats).astype(np.float32)], axis=1)
    return feats, stats


class DRFI(SaliencyMethod):
    name = "drfi"
    resources = Resources(num_cpus=1)
    batch_size = 8

    def __init__(
        self,
        scorer: str = "forest",
        model: str | None = None,
        levels: str = "multi",
        sigma: float | None = None,
        k: float | None = None,
        min_size: int | None = None,
        refine: bool | int = True,
        backend: str | None = None,
        fusion: str = "auto",
    ):
        param_choice("levels", levels, tuple(LEVEL_SETS))
        self.levels_name = levels
        self.levels = list(LEVEL_SETS[levels])
        if any(v is not None for v in (sigma, k, min_size)):
            if levels != "harl":
                raise ValueError(
                    "drfi: sigma/k/min_size override the single HARL level only (add levels=harl)"
                )
            s0, k0, m0 = self.levels[0]
            # upper bounds: past them the segmentation is one region (or a C integer overflows)
            sigma = s0 if sigma is None else param_number("sigma", sigma, low=0.0, high=1e3)
            k = k0 if k is None else param_number("k", k, low=0.0, strict=True, high=1e9)
            min_size = (
                m0
                if min_size is None
                else int(param_number("min_size", min_size, low=1.0, integer=True, high=MAX_PIXELS))
            )
            self.levels = [(float(sigma), float(k), min_size)]
        self.scorer_name = scorer
        self.scorers = make_scorers(scorer, model)
        self.refine = bool(refine)
        self.backend = resolve_backend(backend, "drfi")
        self.fusion_weights = self._fusion_weights(fusion)

    def _fusion_weights(self, fusion: str) -> np.ndarray | None:
        """``auto``: the forest's learned level weights when it carries them for these levels and
        this refine setting, else uniform; ``uniform``: always uniform; ``learned``: the forest's,
        or an error."""
        param_choice("fusion", fusion, FUSIONS)
        forests = [sc for sc in self.scorers if isinstance(sc, ForestScorer)]
        if fusion == "uniform" or not forests:
            if fusion == "learned":
                raise ValueError("drfi: fusion=learned needs a forest scorer whose model has fusion weights")
            return None
        weights = fusion_weights(forests[0].forest.info, self.levels_name, len(self.levels), self.refine)
        if weights is None and fusion == "learned":
            raise ValueError(
                f"drfi: fusion=learned: {forests[0].source} has no fusion weights for levels={self.levels_name} "
                f"refine={int(self.refine)} (maskgen drfi fit --fusion learned)"
            )
        return weights

    @classmethod
    def canonical_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        out = dict(args)
        if out.get("model") not in (None, "", *SHIPPED_MODELS):
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
        if self.fusion_weights is not None:  # absent for uniform fusion: older manifests unchanged
            params["fusion"] = [round(float(w), 6) for w in self.fusion_weights]
        return params

    def saliency(self, rgb: np.ndarray) -> np.ndarray:
        pix = pixel_features(rgb)
        labels, scores, stats = [], [], []
        cues = any(sc.needs_cues for sc in self.scorers)
        for lab in segment_levels(rgb, self.levels, self.backend):
            feats, st = describe_level(pix, lab, cues)
            labels.append(lab)
            stats.append(st)
            scores.append([sc.score(feats, st) for sc in self.scorers])
        if self.refine and max(st.area.size for st in stats) > 1:
            graph = LevelGraph.build(pix, labels, stats)
            refined = graph.refine([level_values(s) for s in scores], self.fusion_weights)
            return refined[labels[graph.finest]].astype(np.float32)
        return fuse([level_map(s, lab) for ss, lab in zip(scores, labels, strict=True) for s in ss])

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.saliency(im) for im in images]
