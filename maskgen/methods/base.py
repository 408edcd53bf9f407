"""The mask-method interface: decoded RGB images in, soft saliency maps in [0, 1] out.

Binarisation, clean-up and fallbacks are shared (``maskgen.postprocess``), so a method only
computes saliency. Each method says what it needs (CPU threads or a GPU) so the pipeline
can schedule it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from maskio.settings import SettingError, check_limits, range_text


@dataclass(frozen=True)
class Resources:
    num_cpus: float = 1.0
    num_gpus: float = 0.0


class SaliencyMethod(ABC):
    """Base class; subclasses set ``name`` and implement ``predict``."""

    name: ClassVar[str]
    # What one shard task needs, the images per ``predict`` call, and whether the method decodes
    # plain JPEG bytes itself (e.g. on a GPU: the worker then reads only those files' headers
    # and calls ``predict_encoded``). Class defaults; a method may set them per instance from
    # its parameters, and the pipeline plans from the configured instance.
    resources: Resources = Resources()
    batch_size: int = 16
    decodes_jpeg: bool = False
    # True for a method whose map is the source's own ground truth (``gt``): the worker then
    # reads each item's mask and calls ``predict_with_truth`` instead of ``predict``.
    reads_ground_truth: bool = False

    @property
    def exact_masks(self) -> bool:
        """True when the method's maps are final masks that the shared post-processing must not
        change (no component filter, no fallback): ``gt`` with ``exact`` or ``quality``."""
        return False

    @classmethod
    def canonical_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments that rebuild the same method in any worker process (e.g. with
        file paths made absolute, since a worker's working directory may differ)."""
        return dict(args)

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters; recorded in every sample as ``method_params``."""

    def runtime_params(self) -> dict[str, Any]:
        """What this worker process actually ran with (device, precision), once it has run;
        merged into each sample's ``method_params``. Empty for methods that have no choice."""
        return {}

    @abstractmethod
    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Soft saliency (float32, H x W, values in [0, 1]) for each H x W x 3 uint8 image."""

    def predict_encoded(self, inputs: Sequence[bytes | np.ndarray]) -> list[np.ndarray]:
        """As ``predict``, for a batch that mixes plain JPEG bytes (for a method with
        ``decodes_jpeg``) and images the worker decoded (every other file)."""
        raise NotImplementedError(f"{self.name} decodes no JPEG bytes itself")

    def predict_with_truth(
        self, images: Sequence[np.ndarray], truths: Sequence[np.ndarray | None]
    ) -> list[np.ndarray]:
        """As ``predict``, given each image's ground truth (bool H x W, or None when it has
        none), for a method with ``reads_ground_truth``."""
        raise NotImplementedError(f"{self.name} reads no ground truth")


def param_number(
    name: str, value: Any, low: float, strict: bool = False, integer: bool = False, high: float | None = None
) -> float:
    """``value`` as a finite number ``>= low`` (``> low`` when ``strict``) and ``<= high``, or a
    ValueError naming ``--param``. The range is checked as every setting's is (maskio.settings)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--param {name}={value}: must be {kind}")
    limits = {"ge": None if strict else low, "gt": low if strict else None, "le": high, "lt": None}
    try:
        check_limits(name, value, limits)
    except SettingError:
        raise ValueError(f"--param {name}={value}: must be {kind} {range_text(limits)}") from None
    if integer and value != int(value):
        raise ValueError(f"--param {name}={value}: must be {kind}")
    return float(value)


def param_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, or a ValueError naming ``--param`` and the choices."""
    try:
        check_limits(f"--param {name}", value, {"choices": tuple(choices)})
    except SettingError as exc:
        raise ValueError(str(exc)) from None
    return value
