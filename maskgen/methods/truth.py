"""The source's own ground-truth masks, as they are or made worse to a chosen quality.

Three uses: sharding a dataset that ships its masks (DUTS, COCO instances, PASCAL-S) so that
sslmask trains on them like on any other build (the default: the shared post-processing
applies, so a tiny or near-full mask becomes the centre prior, as for any method); the oracle
arm of an ablation (``exact=true``: the masks byte for byte, no post-processing, no fallback);
and the dose-response arms of one (``quality=Q``: exact masks degraded along the image's own
segments to IoU Q against the truth, see ``degrade.py``; implies ``exact``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maskgen.groundtruth import fit_to_shape
from maskgen.methods.base import SaliencyMethod, param_number
from maskgen.methods.degrade import degrade


class SourceMasks(SaliencyMethod):
    name = "gt"
    batch_size = 64
    reads_ground_truth = True

    def __init__(self, exact: bool = False, quality: float | None = None, seed: int = 0) -> None:
        """``exact``: no post-processing; ``quality``: the target IoU in (0, 1] of degraded
        masks (exact implied); ``seed``: which degraded version (with ``quality`` only)."""
        if not isinstance(exact, bool):
            raise ValueError(f"--param exact={exact}: must be true or false")
        self.quality = (
            None if quality is None else param_number("quality", quality, 0.0, strict=True, high=1.0)
        )
        self.seed = int(param_number("seed", seed, 0, integer=True, high=2**32 - 1))
        if self.quality is None and seed != 0:
            raise ValueError("--param seed: only with --param quality (exact masks have one version)")
        self.exact = exact or self.quality is not None

    @property
    def params(self) -> dict[str, Any]:
        """Empty for the default (so builds made before these options keep their fingerprint)."""
        if self.quality is not None:
            return {"exact": True, "quality": self.quality, "seed": self.seed}
        return {"exact": True} if self.exact else {}

    @property
    def exact_masks(self) -> bool:
        return self.exact

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise ValueError("--method gt copies the source's ground truth; it has no map of its own")

    def predict_with_truth(
        self, images: Sequence[np.ndarray], truths: Sequence[np.ndarray | None]
    ) -> list[np.ndarray]:
        """Each image's mask as a 0/1 map at the image's size (nearest-neighbour when the mask
        was stored at another size); an image without one is refused, so the build records
        and skips it."""
        maps = []
        for image, truth in zip(images, truths, strict=True):
            if truth is None:
                raise ValueError("no ground-truth mask for this image")
            mask = fit_to_shape(truth, image.shape[:2])
            if self.quality is not None:
                mask = degrade(mask, image, self.quality, self.seed)
            maps.append(mask.astype(np.float32))
        return maps
