"""Any image tree, with optional ground-truth masks and optional class sub-folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.imaging import load_binary_mask
from maskgen.sources.base import (
    ItemRef,
    Source,
    SourceError,
    index_masks,
    read_file,
    require_dir,
    unique_keys,
    walk_images,
)


class FolderSource(Source):
    """``root/**/*.{jpg,png,...}``; masks in ``gt`` matched by relative path and stem.

    With ``class_folders`` the first path component is the class and the label is its
    position in the sorted list of class folders (torchvision ImageFolder's rule).
    """

    name = "folder"

    def __init__(self, root: str, gt: str | None = None, class_folders: bool = False):
        self._root = require_dir(root, "--root")
        self._gt = require_dir(gt, "--gt") if gt else None
        self.class_folders = bool(class_folders)
        self._classes: list[str] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "root": str(self._root.resolve()),
            "gt": str(self._gt.resolve()) if self._gt else None,
            "class_folders": self.class_folders,
        }

    @property
    def root(self) -> str:
        return str(self._root)

    @property
    def class_names(self) -> list[str] | None:
        if self.class_folders and self._classes is None:
            self.list_items()
        return self._classes

    def list_items(self) -> list[ItemRef]:
        paths = walk_images(self._root)
        if not paths:
            raise SourceError(f"--root {self._root}: no images found")
        labels: list[int | None] = [None] * len(paths)
        if self.class_folders:
            loose = [p for p in paths if "/" not in p]
            if loose:
                raise SourceError(
                    f"--root {self._root}: {loose[0]} is not inside a class folder (--class-folders)"
                )
            self._classes = sorted({p.split("/", 1)[0] for p in paths})
            index = {c: i for i, c in enumerate(self._classes)}
            labels = [index[p.split("/", 1)[0]] for p in paths]
        masks = index_masks(self._gt) if self._gt else {}
        return [
            ItemRef(key=k, path=p, label=lab, gt=masks.get(os.path.splitext(p)[0]))
            for k, p, lab in zip(unique_keys(paths), paths, labels, strict=True)
        ]

    def read(self, item: ItemRef) -> bytes:
        return read_file(self._root / item.path)

    def ground_truth(self, item: ItemRef) -> np.ndarray | None:
        if self._gt is None or item.gt is None:
            return None
        return load_binary_mask(read_file(Path(self._gt) / item.gt))
