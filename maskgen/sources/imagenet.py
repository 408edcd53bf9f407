"""ILSVRC-2012 layouts: ``train/<wnid>/*.JPEG`` and ``val/`` (flat or ``val/<wnid>/``).

Labels are the position of the wnid in the sorted wnid list (the convention of torchvision
and timm). For a flat ``val/`` the labels come from ``LOC_val_solution.csv`` (the Kaggle
release) or a two-column ``filename wnid`` text file. Optional ground truth: ImageNet-S
masks (``<wnid>/<stem>.png``, class id = R + 256·G, foreground = any id except 0 and the
ignore id 1000) or plain binary masks with the same names.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskgen.imaging import load_binary_mask
from maskgen.sources.base import (
    ItemRef,
    KeyAllocator,
    Source,
    SourceError,
    index_masks,
    read_file,
    require_dir,
    walk_images,
)

IMAGENET_S_IGNORE = 1000
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"


class ImageNetSource(Source):
    name = "imagenet"

    def __init__(
        self,
        root: str,
        split: str = "train",
        gt: str | None = None,
        val_labels: str | None = None,
        classes: str | None = None,
    ):
        if split not in ("train", "val"):
            raise SourceError(f"--split must be 'train' or 'val', got {split!r}")
        self._root = require_dir(root, "--root")
        self.split = split
        self._split_dir = require_dir(self._root / split, f"--root {self._root}: split folder")
        self._gt = require_dir(gt, "--gt") if gt else None
        self._val_labels = Path(val_labels) if val_labels else None
        if self._val_labels and not self._val_labels.is_file():
            raise SourceError(f"--val-labels {self._val_labels}: no such file")
        self._wnids = self._find_wnids()
        self._subset = self._read_classes(classes) if classes else None
        if self._subset:
            self._wnids = self._subset

    def _read_classes(self, path: str) -> list[str]:
        """A class subset (ImageNet-100 and the like): wnids separated by whitespace."""
        file = Path(path)
        if not file.is_file():
            raise SourceError(f"--classes {path}: no such file")
        lines = [line.split("#", 1)[0] for line in file.read_text().splitlines()]
        wnids = sorted({w for line in lines for w in line.split()})
        unknown = [w for w in wnids if w not in set(self._wnids)]
        if not wnids or unknown:
            raise SourceError(
                f"--classes {path}: {'no wnids' if not wnids else f'unknown class {unknown[0]!r}'}"
            )
        return wnids

    def config(self) -> dict[str, Any]:
        return {
            "root": str(self._root.resolve()),
            "split": self.split,
            "gt": str(self._gt.resolve()) if self._gt else None,
            "val_labels": str(self._val_labels.resolve()) if self._val_labels else None,
            **({"classes": self._subset} if self._subset else {}),
        }

    @property
    def root(self) -> str:
        return str(self._root)

    @property
    def class_names(self) -> list[str]:
        return self._wnids

    def _find_wnids(self) -> list[str]:
        for d in (self._root / "train", self._root / "val"):
            if d.is_dir():
                subdirs = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name.startswith("n"))
                if subdirs:
                    return subdirs
        mapping = self._root / SYNSET_MAPPING
        if mapping.is_file():
            with open(mapping) as f:
                return sorted(line.split()[0] for line in f if line.strip())
        raise SourceError(
            f"--root {self._root}: cannot find the class list (no train/<wnid>/ folders and no {SYNSET_MAPPING})"
        )

    def _flat_val_labels(self) -> dict[str, str]:
        """stem -> wnid for a flat val/ folder."""
        path = self._val_labels or (self._root / VAL_SOLUTION)
        if not path.is_file():
            raise SourceError(
                f"--root {self._root}: val/ is flat and no labels were found "
                f"(give --val-labels FILE or put {VAL_SOLUTION} in the root)"
            )
        out: dict[str, str] = {}
        with open(path, newline="") as f:
            text = f.read()
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines and all(ln.isdigit() for ln in lines):
            return self._devkit_val_labels(path, lines)
        if text.startswith("ImageId"):
            for row in csv.DictReader(io.StringIO(text)):
                out[row["ImageId"]] = row["PredictionString"].split()[0]
        else:
            for n, line in enumerate(text.splitlines(), 1):
                parts = line.replace(",", " ").split()
                if not parts:
                    continue
                if len(parts) < 2:
                    raise SourceError(f"{path}:{n}: expected 'filename wnid'")
                name, lab = parts[0], parts[1]
                out[os.path.splitext(os.path.basename(name))[0]] = (
                    self._wnids[int(lab)] if lab.isdigit() else lab
                )
        return out

    def _devkit_val_labels(self, path: Path, lines: list[str]) -> dict[str, str]:
        """ILSVRC2012_validation_ground_truth.txt: line i holds the ILSVRC2012_ID of val image i;
        the ID -> wnid table is the devkit's meta.mat in the same folder."""
        from scipy.io import loadmat

        meta = path.parent / "meta.mat"
        if not meta.is_file():
            raise SourceError(f"{path}: devkit ground truth needs meta.mat in the same folder")
        try:
            synsets = loadmat(meta, squeeze_me=True)["synsets"]
            id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        except Exception as exc:
            raise SourceError(f"{meta}: not a readable ILSVRC devkit meta.mat ({exc})") from None
        try:
            return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[int(v)] for i, v in enumerate(lines, 1)}
        except KeyError as exc:
            raise SourceError(f"{path}: ILSVRC2012_ID {exc} is not in {meta}") from None

    def list_items(self) -> list[ItemRef]:
        paths = walk_images(self._split_dir)
        if not paths:
            raise SourceError(f"--root {self._root}: no images in {self.split}/")
        index = {w: i for i, w in enumerate(self._wnids)}
        flat = any("/" not in p for p in paths)
        val_map = self._flat_val_labels() if flat else {}
        masks = index_masks(self._gt) if self._gt else {}
        items: list[ItemRef] = []
        new_key = KeyAllocator()
        for p in paths:
            stem = os.path.splitext(os.path.basename(p))[0]
            wnid = p.split("/", 1)[0] if "/" in p else val_map.get(stem)
            if self._subset and wnid not in index:
                continue  # outside the chosen classes
            if wnid not in index:
                raise SourceError(f"{self._split_dir / p}: unknown class {wnid!r}")
            key = new_key(stem)
            gt = masks.get(f"{wnid}/{stem}") or masks.get(stem)
            items.append(ItemRef(key=key, path=f"{self.split}/{p}", label=index[wnid], gt=gt))
        return items

    def read(self, item: ItemRef) -> bytes:
        return read_file(self._root / item.path)

    def ground_truth(self, item: ItemRef) -> np.ndarray | None:
        if self._gt is None or item.gt is None:
            return None
        data = read_file(self._gt / item.gt)
        with Image.open(io.BytesIO(data)) as im:
            if im.mode == "RGB":  # ImageNet-S encoding: id = R + 256 * G
                arr = np.asarray(im).astype(np.int32)
                ids = arr[:, :, 0] + 256 * arr[:, :, 1]
                return (ids != 0) & (ids != IMAGENET_S_IGNORE)
        return load_binary_mask(data)
