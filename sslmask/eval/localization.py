"""Weakly supervised localisation (SegAS's protocol, docs/methods.md §4.4 and §7.5).

Each image is resized to S x S (wsolevaluation's choice ⟨A⟩: no crop, so no box is cut) and
its ground-truth boxes are scaled alike. The heatmap is either a class activation map (Zhou et
al. 2016: the linear probe's weights on the raw features of the true class, or of the
predicted class, summed over the backbone's last grid) or, without classes, the class-agnostic
channel mean of that grid. It is upsampled, min-max normalised and thresholded at
``threshold`` (0.2 ⟨A⟩); the tight box of its largest connected component is the prediction.

- GT-known Loc: IoU >= 0.5 with any ground-truth box of the image (the true class's boxes);
- Top-1 Loc: GT-known and the top-1 class is right; Top-1 Cls: the probe's top-1. The probe
  is fitted on the training images preprocessed exactly as the test images are (resized to
  S x S, no crop: :func:`resized_features`), so Top-1 Cls scores the probe on its own inputs;
- ``whole_image``: the Loc of always predicting the whole image, the floor to read them against.

Boxes (x0, y0, x1, y1) in source pixels come from CUB's ``images.txt`` +
``bounding_boxes.txt``, ImageNet's val XML files or ``LOC_val_solution.csv``, or a folder of
ground-truth masks (the tight box of each connected component). They are matched to samples
by key: the sanitised relative path without extension, as maskgen names samples, else the
file's own stem when that is unique.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from maskio.errors import ShardError, ShardFormatError
from maskio.records import IMAGE_EXTS, FileReader, Records, read_image
from maskio.shard_format import open_limited, sanitize_key
from sslmask.backbones import normalize
from sslmask.pooling import channel_heatmap, normalise_per_image

Box = tuple[float, float, float, float]


def path_key(relpath: str) -> str:
    """The key maskgen gives the file at ``relpath`` (no extension, sanitised)."""
    return sanitize_key(os.path.splitext(relpath)[0])


def boxes_from_cub(root: Path) -> dict[str, list[Box]]:
    """CUB-200-2011: ``images.txt`` (id path) and ``bounding_boxes.txt`` (id x y w h)."""
    paths = dict(
        line.split(maxsplit=1) for line in (root / "images.txt").read_text().splitlines() if line.strip()
    )
    out: dict[str, list[Box]] = {}
    for line in (root / "bounding_boxes.txt").read_text().splitlines():
        if line.strip():
            image_id, x, y, w, h = line.split()
            x0, y0 = float(x), float(y)
            out.setdefault(path_key(paths[image_id].strip()), []).append(
                (x0, y0, x0 + float(w), y0 + float(h))
            )
    return out


def boxes_from_imagenet_xml(folder: Path) -> dict[str, list[Box]]:
    """ImageNet's per-image PASCAL-VOC XML files (inclusive pixel corners)."""
    out: dict[str, list[Box]] = {}
    for path in sorted(folder.rglob("*.xml")):
        root = ET.parse(path).getroot()  # noqa: S314 - local annotation files, no entities expanded
        boxes = []
        for box in root.iter("bndbox"):
            x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x0, y0, x1 + 1, y1 + 1))
        out[path_key(path.name)] = boxes
    return out


def boxes_from_loc_csv(path: Path) -> dict[str, list[Box]]:
    """ImageNet's ``LOC_val_solution.csv``: ImageId, "wnid x0 y0 x1 y1 wnid ..."."""
    out: dict[str, list[Box]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            parts = row["PredictionString"].split()
            boxes = [tuple(float(v) for v in parts[i + 1 : i + 5]) for i in range(0, len(parts), 5)]
            out[path_key(row["ImageId"])] = [(x0, y0, x1 + 1, y1 + 1) for x0, y0, x1, y1 in boxes]
    return out


class MaskBoxes(list):
    """The boxes of one ground-truth mask, with the mask's own ``(width, height)``: the image
    they are matched to must have that size, or the boxes would be scaled as someone else's."""

    def __init__(self, boxes: list[Box], frame: tuple[int, int]):
        super().__init__(boxes)
        self.frame = frame


def boxes_from_masks(folder: Path) -> dict[str, list[Box]]:
    """The tight box of each connected component of each ground-truth mask (> 127)."""
    out: dict[str, list[Box]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTS:
            try:
                with open_limited(path, str(path)) as im:
                    fg = np.asarray(im.convert("L")) > 127
            except ShardFormatError as exc:
                raise ShardError(str(exc)) from None
            labels, _ = ndimage.label(fg)
            boxes = [(float(sx.start), float(sy.start), float(sx.stop), float(sy.stop))
                     for sy, sx in ndimage.find_objects(labels)]  # fmt: skip
            out[path_key(str(path.relative_to(folder)))] = MaskBoxes(boxes, (fg.shape[1], fg.shape[0]))
    return out


def read_boxes(boxes: str | None, gt_masks: str | None) -> dict[str, list[Box]]:
    """Boxes from ``--boxes`` (a CUB root or its bounding_boxes.txt, an XML folder, a
    LOC_val_solution.csv) or ``--gt-masks`` (a mask folder)."""
    path = Path(gt_masks or boxes or "")
    try:
        if gt_masks:
            return boxes_from_masks(path)
        if path.is_file() and path.suffix.lower() == ".csv":
            return checked_boxes(boxes_from_loc_csv(path), path)
        if path.is_file() and path.name == "bounding_boxes.txt":
            return checked_boxes(boxes_from_cub(path.parent), path)
        if path.is_dir() and (path / "bounding_boxes.txt").is_file():
            return checked_boxes(boxes_from_cub(path), path)
        if path.is_dir():
            return checked_boxes(boxes_from_imagenet_xml(path), path)
    except (ValueError, KeyError, TypeError, ET.ParseError, OSError) as exc:  # a malformed annotation file
        raise ShardError(f"{path}: unreadable boxes ({type(exc).__name__}: {exc})") from exc
    raise ShardError(f"{path}: not a CUB bounding_boxes.txt, an XML folder or a LOC_val_solution.csv")


MAX_COORD = 1e6  # pixels: far past any photo, short of overflow


def checked_boxes(boxes: dict[str, list[Box]], source: Path) -> dict[str, list[Box]]:
    """``boxes``, or one line naming the first that is not a box: finite, x0 < x1 and y0 < y1,
    inside [0, 1e6] (NaN, negative or 1e308 corners would score silently)."""
    for key, items in boxes.items():
        for x0, y0, x1, y1 in items:
            coords = np.asarray([x0, y0, x1, y1])
            if not (np.isfinite(coords).all() and (coords >= 0).all() and (coords <= MAX_COORD).all()
                    and x0 < x1 and y0 < y1):  # fmt: skip
                raise ShardError(f"{source}: {key}: ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not a box")
    return boxes


def record_keys(records: Records) -> list[str]:
    """Each sample's key: its shard key, or for an image folder class/file as maskgen names it."""
    if (
        records.image_root is not None or not (records.image[:, 1] == -1).all()
    ):  # shards (an image folder's samples are whole files)
        return list(records.names)
    return [path_key(f"{Path(records.files[int(i)]).parent.name}/{Path(records.files[int(i)]).name}")
            for i in records.image[:, 0]]  # fmt: skip


def match_boxes(keys: list[str], boxes: dict[str, list[Box]]) -> list[list[Box] | None]:
    """Boxes per sample: by key, else by the last path component when that is unique."""
    tails: dict[str, list[str]] = {}
    for k in boxes:
        tails.setdefault(k.rsplit("__", 1)[-1], []).append(k)
    out = []
    for key in keys:
        found = boxes.get(key)
        if found is None:
            same = tails.get(key.rsplit("__", 1)[-1], [])
            found = boxes[same[0]] if len(same) == 1 else None
        out.append(found)
    return out


class ResizedDataset(Dataset):
    """Images resized to S x S (no crop), with their labels and source sizes."""

    def __init__(self, records: Records, indices: list[int], size: int):
        self.records, self.indices, self.size = records, indices, int(size)
        self.reader = FileReader(records.files)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        rec, index = self.records, self.indices[i]
        image = read_image(self.reader, rec, index, rec.names[index])
        resized = np.asarray(image.resize((self.size, self.size), Image.BICUBIC), dtype=np.uint8)
        return (
            torch.from_numpy(resized.copy()).permute(2, 0, 1),
            int(rec.labels[index]),
            torch.tensor(image.size),
        )


@torch.no_grad()
def resized_features(backbone, records: Records, size: int, batch_size: int, workers: int, device) -> tuple:
    """``(N x C pooled features, N labels)`` of every record resized to S x S (no crop): the
    probe's training features, preprocessed as :func:`localization_eval` preprocesses its tests."""
    loader = DataLoader(ResizedDataset(records, list(range(len(records))), size), batch_size=batch_size,
                        num_workers=workers)  # fmt: skip
    backbone.eval()
    feats, labels = [], []
    for images, y, _ in loader:
        feats.append(backbone.pooled(normalize(images.to(device))).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def box_from_heatmap(heat: np.ndarray, threshold: float) -> Box:
    """The tight box of the largest connected component of {heat >= threshold} (a [0, 1] map)."""
    labels, n = ndimage.label(heat >= threshold)
    if n == 0:
        return (0.0, 0.0, float(heat.shape[1]), float(heat.shape[0]))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    sy, sx = ndimage.find_objects((labels == int(np.argmax(sizes)) + 1).astype(np.int32))[0]
    return (float(sx.start), float(sy.start), float(sx.stop), float(sy.stop))


def iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def scale_boxes(boxes: list[Box], source: tuple[int, int], size: int) -> list[Box]:
    sx, sy = size / source[0], size / source[1]
    return [(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in boxes]


@torch.no_grad()
def localization_eval(backbone, val: Records, boxes: list[list[Box] | None], probe, options: dict) -> dict:
    """GT-known / Top-1 Loc (with a ``fit_linear`` probe) or class-agnostic Loc (``probe``
    None) over the samples that have boxes. ``options``: image_size, threshold, iou,
    batch_size, workers, device."""
    size, device = options["image_size"], options["device"]
    indices = [i for i, b in enumerate(boxes) if b]
    loader = DataLoader(ResizedDataset(val, indices, size), batch_size=options["batch_size"],
                        num_workers=options["workers"])  # fmt: skip
    backbone.eval()
    hits = {"gt_known": 0, "top1_loc": 0, "top1_cls": 0, "whole_image": 0}
    seen = 0
    for images, labels, sources in loader:
        x = normalize(images.to(device))
        grid = backbone(x).float()
        if probe is None:
            heat = channel_heatmap(grid, (size, size))
            correct = torch.zeros(len(x), dtype=torch.bool)
        else:
            logits = probe.logits(backbone.pooled(x).float().cpu())
            target = probe.index(labels)
            correct = logits.argmax(1) == target
            weights = probe.raw_weights().to(device)[target.clamp_min(0).to(device)]  # the true class
            cam = torch.einsum("nc,nchw->nhw", weights, grid)[:, None]
            heat = normalise_per_image(
                F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
            )
        for row in range(len(x)):
            source = tuple(sources[row].tolist())
            frame = getattr(boxes[indices[seen + row]], "frame", source)
            if frame != source:
                name = val.names[indices[seen + row]] if val.names else indices[seen + row]
                raise ShardError(f"{name}: its ground-truth mask is {frame[0]}x{frame[1]}, "
                                 f"the image {source[0]}x{source[1]}")  # fmt: skip
            gt = scale_boxes(boxes[indices[seen + row]], source, size)
            pred = box_from_heatmap(heat[row, 0].cpu().numpy(), options["threshold"])
            located = max(iou(pred, b) for b in gt) >= options["iou"]
            hits["gt_known"] += int(located)
            hits["top1_loc"] += int(located and bool(correct[row]))
            hits["top1_cls"] += int(correct[row])
            hits["whole_image"] += int(max(iou((0, 0, size, size), b) for b in gt) >= options["iou"])
        seen += len(x)
    n = max(len(indices), 1)
    pct = {k: round(100.0 * v / n, 2) for k, v in hits.items()}
    # whole_image: the Loc of predicting the whole image every time, the floor to compare with
    result = {
        "images": len(indices),
        "unmatched": len(boxes) - len(indices),
        "whole_image": pct.pop("whole_image"),
    }
    if probe is None:
        return {**result, "loc": pct["gt_known"]}
    return {**result, **pct}
