"""The source interface: a cheap, sorted listing of items, and a reader for one item.

Listing never decodes an image, so a build can be planned and split into shards up front
(and a resumed build can check it plans the same thing). Item references are small and
picklable: they travel to the Ray workers that read the bytes.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from maskio.shard_format import sanitize_key

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm"}
)
MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".pgm", ".pbm", ".webp")


class SourceError(Exception):
    """A problem with the source as a whole (missing root, nothing to read): fatal, one line."""


@dataclass(frozen=True)
class ItemRef:
    key: str  # unique, no dots
    path: str  # relative to the source root, '/'-separated
    label: int | None = None
    gt: Any = None  # source-specific reference to the ground truth (a path, COCO annotations, ...)


class Source(ABC):
    """Base class; subclasses set ``name`` and implement listing and reading."""

    name: ClassVar[str]

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable arguments that rebuild this source (manifest, workers)."""

    @abstractmethod
    def list_items(self) -> list[ItemRef]:
        """All items, sorted, with unique keys. Raises SourceError when there are none."""

    @abstractmethod
    def read(self, item: ItemRef) -> bytes:
        """The image file's bytes (raises OSError when unreadable)."""

    def ground_truth(self, item: ItemRef) -> np.ndarray | None:
        """Ground-truth foreground (bool H x W, upright) or None when the item has none."""
        return None

    @property
    def class_names(self) -> list[str] | None:
        """Class names indexed by label, or None when the source has no labels."""
        return None

    @property
    def root(self) -> str | None:
        return None


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"{what} {p}: no such directory")
    if not p.is_dir():
        raise SourceError(f"{what} {p}: not a directory")
    return p


def walk_images(root: Path) -> list[str]:
    """Relative '/'-separated paths of every file with an image extension, sorted.

    Broken links and unreadable files are listed too: they become per-item errors in the
    build, never a crash of the listing.
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            if os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                rel = os.path.relpath(os.path.join(dirpath, fn), root)
                found.append(rel.replace(os.sep, "/"))
    found.sort()
    return found


class KeyAllocator:
    """Unique keys in listing order: a clash gets ``_1``, ``_2``, ... (deterministic)."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def __call__(self, text: str) -> str:
        base = sanitize_key(text)
        key, n = base, 0
        while key in self._used:
            n += 1
            key = f"{base}_{n}"
        self._used.add(key)
        return key


def unique_keys(paths: list[str]) -> list[str]:
    """Keys from relative paths without their extension."""
    alloc = KeyAllocator()
    return [alloc(os.path.splitext(p)[0]) for p in paths]


def index_masks(gt_root: Path) -> dict[str, str]:
    """Map 'relative/path/stem' -> mask file, preferring extensions in MASK_EXTENSIONS order."""
    rank = {ext: i for i, ext in enumerate(MASK_EXTENSIONS)}
    best: dict[str, tuple[int, str]] = {}
    for rel in walk_images(gt_root):
        stem, ext = os.path.splitext(rel)
        r = rank.get(ext.lower(), len(rank))
        if stem not in best or r < best[stem][0]:
            best[stem] = (r, rel)
    return {stem: rel for stem, (_, rel) in best.items()}


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()
