"""The embedded sample source: works offline on a fresh install.

Two parts: ``sample_size`` synthetic scenes with exact masks and class labels
(``maskgen.sources.synthetic``, paths ``scenes/NNNNNN.jpg``), then the natural photos
scikit-image ships (``skimage/NAME``, original bytes, no ground truth). The photos get the
label of an extra class ``photo`` so every sample of the set carries the same fields.

A scene's label is its object's surface appearance (5 kinds, the default) or its silhouette
(6 shapes). Appearance is what a small network learns in a CPU demo while the textured
background distracts it; shape needs far more compute (README, "Training").
Scenes sort first so that the Hugging Face loader, which infers the json schema from the
first five samples, sees a numeric ``iou`` there.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from PIL import Image

from maskgen.sources.base import ItemRef, Source, SourceError, read_file
from maskgen.sources.synthetic import APPEARANCES, SHAPES, render_scene, scene_classes, skimage_data_dir
from maskio.shard_format import JPEG_QUALITY

PHOTOS = (
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "moon.png",
    "motorcycle_left.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
)
LABELINGS = {"appearance": APPEARANCES, "shape": SHAPES}
DEFAULT_LABELS = "appearance"
DEFAULT_SAMPLE_SIZE = 200
MAX_SAMPLE_SIZE = 1_000_000  # synthetic scenes: a demo and test source, planned eagerly


def class_names(labels: str = DEFAULT_LABELS) -> list[str]:
    """The class names of a labelling: its scene classes, then ``photo``."""
    return [*LABELINGS[labels], "photo"]


class SampleSource(Source):
    name = "sample"

    def __init__(
        self,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        seed: int = 0,
        photos: bool = True,
        labels: str = DEFAULT_LABELS,
    ):
        if sample_size < 0:
            raise SourceError(f"--sample-size must be >= 0, got {sample_size}")
        if labels not in LABELINGS:
            raise SourceError(f"--sample-labels must be one of {sorted(LABELINGS)}, got {labels!r}")
        self.sample_size = int(sample_size)
        self.seed = int(seed)
        self.photos = bool(photos)
        self.labels = labels

    def config(self) -> dict[str, Any]:
        return {
            "sample_size": self.sample_size,
            "seed": self.seed,
            "photos": self.photos,
            "labels": self.labels,
        }

    @property
    def class_names(self) -> list[str]:
        return class_names(self.labels)

    def list_items(self) -> list[ItemRef]:
        items = []
        for i in range(self.sample_size):
            label = getattr(scene_classes(self.seed, i), self.labels)
            items.append(ItemRef(f"scenes__{i:06d}", f"scenes/{i:06d}.jpg", label, gt=i))
        if self.photos:
            for fn in PHOTOS:
                stem = fn.rsplit(".", 1)[0]
                items.append(ItemRef(f"skimage__{stem}", f"skimage/{fn}", len(LABELINGS[self.labels])))
        if not items:
            raise SourceError("--source sample: nothing to generate (--sample-size 0 and no photos)")
        return items

    def read(self, item: ItemRef) -> bytes:
        if item.path.startswith("skimage/"):
            return read_file(skimage_data_dir() / item.path.split("/", 1)[1])
        rgb = _scene(self.seed, int(item.gt))[0]
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def ground_truth(self, item: ItemRef) -> np.ndarray | None:
        if item.gt is None:
            return None
        return _scene(self.seed, int(item.gt))[1]


@functools.lru_cache(maxsize=8)
def _scene(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, Any]:
    return render_scene(seed, index)
