"""The trivial centre-prior baseline: every image gets the same Gaussian bump.

It is the yardstick the real methods must beat (a centre prior is a strong baseline on
object-centric photos) and lets the whole pipeline be tested without any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from maskgen.methods.base import SaliencyMethod, param_number
from maskgen.postprocess import CENTER_SIGMA, center_prior


class CenterPrior(SaliencyMethod):
    name = "center"
    batch_size = 64

    def __init__(self, sigma: float = CENTER_SIGMA):
        self.sigma = param_number("sigma", sigma, low=0.0, strict=True)

    @property
    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [center_prior(im.shape[0], im.shape[1], self.sigma) for im in images]  # shared, read-only
