"""Find the ground truth of a built sample from its json ``path``.

Used after a build (report thumbnails, ``maskgen eval``): either the build's own source,
reopened from the manifest, or a folder of masks (matched by relative path, then stem).
"""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

from maskgen.imaging import ImageDecodeError, load_binary_mask
from maskgen.sources import ItemRef, Source, SourceError, make_source
from maskgen.sources.base import index_masks, read_file, require_dir


class GroundTruthLookup:
    def __init__(
        self, source: Source | None = None, gt_dir: str | None = None, items: list[ItemRef] | None = None
    ):
        """``items``: the source's listing when the caller already has it (saves listing again)."""
        self.source = source
        self.gt_dir = require_dir(gt_dir, "--gt") if gt_dir else None
        self._by_path: dict[str, ItemRef] | None = (
            {it.path: it for it in items} if items is not None else None
        )
        self._masks: dict[str, str] = index_masks(self.gt_dir) if self.gt_dir else {}
        self._by_stem = {os.path.basename(k): v for k, v in self._masks.items()}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], gt_dir: str | None = None) -> GroundTruthLookup:
        """The build's own source (``gt_dir`` overrides it); raises SourceError if it is gone."""
        if gt_dir:
            return cls(gt_dir=gt_dir)
        return cls(source=make_source(manifest["source"], manifest["source_config"]))

    def __call__(self, path: str) -> np.ndarray | None:
        if self.gt_dir is not None:
            stem = os.path.splitext(path)[0]
            rel = self._masks.get(stem) or self._by_stem.get(os.path.basename(stem))
            if not rel:
                return None
            try:
                return load_binary_mask(read_file(self.gt_dir / rel))
            except ImageDecodeError as exc:  # a decompression bomb, not an image: one line naming it
                raise SourceError(f"{self.gt_dir / rel}: ground-truth mask: {exc}") from None
        if self.source is None:
            return None
        if self._by_path is None:
            self._by_path = {it.path: it for it in self.source.list_items()}
        item = self._by_path.get(path)
        if item is None:
            return None
        try:
            return self.source.ground_truth(item)
        except ImageDecodeError as exc:
            raise SourceError(f"{path}: its ground-truth mask: {exc}") from None


def fit_to_shape(gt: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Ground truth at ``shape`` (H, W): nearest-neighbour resize when it was stored at another size."""
    if gt.shape == tuple(shape):
        return gt
    return cv2.resize(gt.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0


def safe_lookup(manifest: dict[str, Any]) -> GroundTruthLookup:
    """A lookup for decoration (report outlines): never fails, finds nothing if the source is gone."""
    try:
        return GroundTruthLookup.from_manifest(manifest)
    except (SourceError, TypeError, OSError):
        return GroundTruthLookup()
