"""Mask quality against object bounding boxes: how good are masks on photos that have boxes
but no masks (ImageNet's own localisation boxes)?

Per photo, with B the union of its boxes rasterised at the mask's pixels and M the mask:
precision |M ∩ B| / |M| (how much of the mask is on an object), recall |M ∩ B| / |B| (how much
of the objects the mask covers) and box IoU |M ∩ B| / |M ∪ B|. A box is coarser than the object
it holds, so box IoU is a proxy with a ceiling below 1 (WSOL papers use the same measure);
compare methods with each other and with the centre prior, not with 1.

The box file is a CSV with a header and one row per box: ``path,x0,y0,x1,y1`` (more columns
are ignored), coordinates in the image's own pixels (x1, y1 exclusive), ``path`` relative to
some image root. A sample is matched to the box rows whose path ends with the same path
components as the sample's own path (the longest common tail that is unique).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from maskgen.pipeline import BuildError
from maskio.shard_format import (
    FIELD_MASK,
    FIELD_META,
    decode_mask_png,
    decode_meta,
    in_sample,
    iter_tar_samples,
)

Box = tuple[float, float, float, float]
MAX_BOX_ROWS = 10_000_000


def read_box_csv(path: str | Path) -> dict[str, list[Box]]:
    """``{relative path: [(x0, y0, x1, y1), ...]}``; one BuildError line naming the file and row
    for a missing column, a non-number, or a box that is empty or starts below 0."""
    path = Path(path)
    boxes: dict[str, list[Box]] = {}
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "x0", "y0", "x1", "y1"} - set(reader.fieldnames or [])
            if missing:
                raise BuildError(f"{path}: not a box CSV (no column {', '.join(sorted(missing))})")
            for row_number, row in enumerate(reader, start=2):
                if row_number > MAX_BOX_ROWS:
                    raise BuildError(f"{path}: more than {MAX_BOX_ROWS:,} boxes")
                boxes.setdefault(str(row["path"]).strip("/"), []).append(_box(row, path, row_number))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BuildError(f"{path}: cannot read the box CSV ({type(exc).__name__}: {exc})") from None
    if not boxes:
        raise BuildError(f"{path}: no boxes")
    return boxes


def _box(row: dict[str, Any], path: Path, row_number: int) -> Box:
    try:
        x0, y0, x1, y1 = (float(row[k]) for k in ("x0", "y0", "x1", "y1"))
    except (TypeError, ValueError):
        raise BuildError(f"{path}:{row_number}: x0, y0, x1, y1 must be numbers") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or min(x0, y0) < 0 or x1 <= x0 or y1 <= y0:
        raise BuildError(f"{path}:{row_number}: not a box ({x0:g}, {y0:g}, {x1:g}, {y1:g})")
    return x0, y0, x1, y1


def box_mask(boxes: list[Box], shape: tuple[int, int]) -> np.ndarray:
    """The union of ``boxes`` as a bool mask: the pixels whose centres lie inside a box."""
    out = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        c0, c1 = max(math.ceil(x0 - 0.5), 0), min(math.ceil(x1 - 0.5), shape[1])
        r0, r1 = max(math.ceil(y0 - 0.5), 0), min(math.ceil(y1 - 0.5), shape[0])
        out[r0:r1, c0:c1] = True
    return out


def box_scores(mask: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """Precision (nan for an empty mask), recall and IoU of ``mask`` against the box mask."""
    inter = np.count_nonzero(mask & boxes)
    area, box_area = np.count_nonzero(mask), np.count_nonzero(boxes)
    return {
        "precision": inter / area if area else math.nan,
        "recall": inter / box_area,
        "iou": inter / np.count_nonzero(mask | boxes),
        "mask_fraction": area / mask.size,
        "box_fraction": box_area / mask.size,
    }


class BoxIndex:
    """Finds a sample's boxes by the longest unique tail of path components it shares with a
    row's path (``val/n01440764/x.JPEG`` matches ``imagenette-224/val/n01440764/x.JPEG``)."""

    def __init__(self, boxes: dict[str, list[Box]]):
        self.boxes = boxes
        self.tails: dict[str, set[str]] = {}
        for key in boxes:
            parts = PurePosixPath(key).parts
            for k in range(1, len(parts) + 1):
                self.tails.setdefault("/".join(parts[-k:]), set()).add(key)

    def find(self, path: str) -> list[Box] | None:
        parts = PurePosixPath(path.replace("\\", "/")).parts
        for k in range(len(parts), 0, -1):
            hits = self.tails.get("/".join(parts[-k:]))
            if hits is not None:
                return self.boxes[next(iter(hits))] if len(hits) == 1 else None
        return None


@dataclass
class BoxReport:
    n_images: int = 0
    scores: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means over the photos with boxes (precision over those whose mask is not empty)."""
        out: dict[str, Any] = {"n_images": self.n_images, "n_with_boxes": len(self.scores)}
        for name in ("precision", "recall", "iou", "mask_fraction", "box_fraction"):
            values = [s[name] for s in self.scores if not math.isnan(s[name])]
            out[f"box_{name}" if name in ("precision", "recall", "iou") else name] = (
                float(np.mean(values)) if values else None
            )
        out["empty_masks"] = sum(math.isnan(s["precision"]) for s in self.scores)
        return out


def score_against_boxes(shards: list[Path], boxes: dict[str, list[Box]]) -> dict[str, Any]:
    """Box precision, recall and IoU of every sample of ``shards`` that has boxes."""
    index, report = BoxIndex(boxes), BoxReport()
    for shard in shards:
        for key, fields in iter_tar_samples(shard, {FIELD_MASK, FIELD_META}):
            report.n_images += 1
            with in_sample(shard, key):
                meta = decode_meta(fields[FIELD_META]) if FIELD_META in fields else {}
                found = index.find(str(meta.get("path") or ""))
                if found is None or FIELD_MASK not in fields:
                    continue
                mask = decode_mask_png(fields[FIELD_MASK])
            report.scores.append(box_scores(mask, box_mask(found, mask.shape)))
    if not report.scores:
        raise BuildError("no sample's path matches a row of the box file (paths are matched by their tail)")
    return report.summary()
