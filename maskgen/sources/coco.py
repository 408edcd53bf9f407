"""COCO: an image folder plus an instances json; ground truth = union of instance masks.

Crowd annotations (``iscrowd=1``, uncompressed RLE) are part of the union: they mark real
foreground (a crowd of people), they are only too dense to split into instances. With a
category filter, only images holding one of the categories are listed and only those
categories count as foreground.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.sources.base import ItemRef, KeyAllocator, Source, SourceError, read_file, require_dir


class CocoSource(Source):
    name = "coco"

    def __init__(self, root: str, annotations: str | None = None, categories: list[str] | None = None):
        self._root = require_dir(root, "--root")
        if not annotations:
            raise SourceError("--source coco needs --annotations FILE (an instances_*.json)")
        self._ann = Path(annotations)
        if not self._ann.is_file():
            raise SourceError(f"--annotations {self._ann}: no such file")
        self.categories = list(categories or [])

    def config(self) -> dict[str, Any]:
        return {
            "root": str(self._root.resolve()),
            "annotations": str(self._ann.resolve()),
            "categories": self.categories,
        }

    @property
    def root(self) -> str:
        return str(self._root)

    def _load(self):
        from pycocotools.coco import COCO

        try:
            with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
                return COCO(str(self._ann))
        except Exception as exc:
            raise SourceError(f"--annotations {self._ann}: not a COCO instances file ({exc})") from None

    def _category_ids(self, coco) -> list[int] | None:
        if not self.categories:
            return None
        by_name = {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())}
        ids = []
        for c in self.categories:
            if c.isdigit() and int(c) in by_name.values():
                ids.append(int(c))
            elif c in by_name:
                ids.append(by_name[c])
            else:
                raise SourceError(f"--annotations {self._ann}: unknown category {c!r}")
        return ids

    def list_items(self) -> list[ItemRef]:
        coco = self._load()
        cat_ids = self._category_ids(coco)
        if cat_ids is None:
            img_ids = coco.getImgIds()
        else:
            img_ids = sorted({i for c in cat_ids for i in coco.getImgIds(catIds=[c])})
        images = sorted(coco.loadImgs(img_ids), key=lambda im: im["file_name"])
        if not images:
            raise SourceError(f"--annotations {self._ann}: no images")
        items, new_key = [], KeyAllocator()
        for im in images:
            ann_ids = coco.getAnnIds(imgIds=[im["id"]], catIds=cat_ids or [], iscrowd=None)
            segs = [a["segmentation"] for a in coco.loadAnns(ann_ids) if a.get("segmentation")]
            key = new_key(Path(im["file_name"]).with_suffix("").as_posix())
            gt = {"height": int(im["height"]), "width": int(im["width"]), "segmentations": segs}
            items.append(ItemRef(key=key, path=im["file_name"], label=None, gt=gt))
        return items

    def read(self, item: ItemRef) -> bytes:
        return read_file(self._root / item.path)

    def ground_truth(self, item: ItemRef) -> np.ndarray | None:
        return union_mask(item.gt["segmentations"], item.gt["height"], item.gt["width"])


def union_mask(segmentations: list[Any], height: int, width: int) -> np.ndarray:
    """Union of COCO segmentations (polygons, RLE or uncompressed RLE) as a bool mask."""
    from pycocotools import mask as mask_utils

    out = np.zeros((height, width), dtype=bool)
    for seg in segmentations:
        if isinstance(seg, list):  # polygons
            rles = mask_utils.frPyObjects(seg, height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE (crowd)
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        out |= mask_utils.decode(rle).astype(bool)
    return out
