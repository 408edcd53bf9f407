"""The source's own ground-truth masks, as they are, as boxes, or made worse to a chosen quality.

Four uses: sharding a dataset that ships its masks (DUTS, COCO instances, PASCAL-S) so that
sslmask trains on them like on any other build (the default: the shared post-processing
applies, so a tiny or near-full mask becomes the centre prior, as for any method); the oracle
arm of an ablation (``exact=true``: the masks byte for byte, no post-processing, no fallback);
the box arm of one (``shape=box``: each object replaced by its bounding box, the mask a
detector's or a box annotation's boxes would give; implies ``exact``); and the dose-response
arms (``quality=Q``: exact masks degraded along the image's own segments to IoU Q against the
truth, see ``degrade.py``; implies ``exact``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from maskgen.groundtruth import fit_to_shape
from maskgen.methods.base import SaliencyMethod, param_choice, param_number
from maskgen.methods.degrade import degrade


class SourceMasks(SaliencyMethod):
    name = "gt"
    batch_size = 64
    reads_ground_truth = True

    def __init__(
        self, exact: bool = False, quality: float | None = None, seed: int = 0, shape: str = "mask"
    ) -> None:
        """``exact``: no post-processing; ``quality``: the target IoU in (0, 1] of degraded
        masks (exact implied); ``seed``: which degraded version (with ``quality`` only);
        ``shape``: ``mask`` (the outline) or ``box`` (each object's bounding box; exact implied)."""
        if not isinstance(exact, bool):
            raise ValueError(f"--param exact={exact}: must be true or false")
        self.quality = (
            None if quality is None else param_number("quality", quality, 0.0, strict=True, high=1.0)
        )
        self.seed = int(param_number("seed", seed, 0, integer=True, high=2**32 - 1))
        self.shape = param_choice("shape", shape, ("mask", "box"))
        if self.quality is None and seed != 0:
            raise ValueError("--param seed: only with --param quality (exact masks have one version)")
        if self.quality is not None and self.shape == "box":
            raise ValueError("--param shape=box: not with --param quality (a box arm is its own quality)")
        self.exact = exact or self.quality is not None or self.shape == "box"

    @property
    def params(self) -> dict[str, Any]:
        """Empty for the default (so builds made before these options keep their fingerprint)."""
        if self.quality is not None:
            return {"exact": True, "quality": self.quality, "seed": self.seed}
        if self.shape == "box":
            return {"exact": True, "shape": "box"}
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
            if self.shape == "box":
                mask = object_boxes(mask)
            maps.append(mask.astype(np.float32))
        return maps


def object_boxes(mask: np.ndarray) -> np.ndarray:
    """Each 8-connected foreground component of ``mask`` filled to its bounding box (the union
    of the boxes where they overlap): the mask one box per object gives, as ImageNet's and
    WSOL's boxes are drawn around each object."""
    fg = (mask > 0.5).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    out = np.zeros_like(fg)
    for x, y, w, h, _area in stats[1:n]:
        out[y : y + h, x : x + w] = 1
    return out
