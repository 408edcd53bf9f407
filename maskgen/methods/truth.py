"""The source's own ground-truth masks, passed through the shared post-processing.

Two uses: the oracle arm of an ablation (what would mask-aware training gain from exact masks,
against DRFI's or a head's?), and sharding a dataset that ships its masks (DUTS, COCO
instances, PASCAL-S) so that sslmask trains on them like on any other build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maskgen.groundtruth import fit_to_shape
from maskgen.methods.base import SaliencyMethod


class SourceMasks(SaliencyMethod):
    name = "gt"
    batch_size = 64
    reads_ground_truth = True

    def __init__(self) -> None:
        """No parameters: the mask is the source's."""

    @property
    def params(self) -> dict[str, Any]:
        return {}

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
            maps.append(fit_to_shape(truth, image.shape[:2]).astype(np.float32))
        return maps
