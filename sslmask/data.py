"""Reading maskgen shards for training: shard resolution and decoded image+mask samples.

Uses only ``maskgen.shard_format`` from maskgen (the contract between the two packages).
Shards are read with ``webdataset``; nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskgen.shard_format import (
    FIELD_CLASS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    SHARDS_DIR,
    decode_class,
    decode_mask_png,
    decode_meta,
    shard_paths,
)


class ShardError(Exception):
    """Shards that cannot be used (missing, empty, or without the fields a method needs)."""


def resolve_shards(specs: Sequence[str]) -> list[str]:
    """Expand build folders, shard folders, globs and brace patterns into tar paths.

    ``OUT`` (a maskgen build) and ``OUT/shards`` give the complete shards of that build;
    ``data/maskgen-{000000..000009}.tar`` and ``data/*.tar`` work as in webdataset.
    """
    import braceexpand

    urls: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            build_dir = path.parent if path.name == SHARDS_DIR else path
            found = [str(p) for p in shard_paths(build_dir)]
            if not found:
                raise ShardError(f"{spec}: no complete maskgen shards in this folder")
            urls.extend(found)
            continue
        expanded = []
        for pattern in braceexpand.braceexpand(spec):
            matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            expanded.extend(matches)
        missing = [u for u in expanded if not Path(u).is_file()]
        if not expanded or missing:
            raise ShardError(f"{spec}: no such shard{'' if not missing else ' ' + missing[0]}")
        urls.extend(expanded)
    if not urls:
        raise ShardError("no shards given")
    return urls


@dataclass
class Sample:
    key: str
    image: np.ndarray | None  # H x W x 3 uint8 (None for masks-only shards)
    mask: np.ndarray  # H x W bool
    label: int | None
    meta: dict[str, Any]


def iter_samples(urls: Sequence[str], require_images: bool = True) -> Iterator[Sample]:
    """Decoded samples in shard order (no shuffling): for inspection and evaluation."""
    import webdataset as wds

    for raw in wds.WebDataset(list(urls), shardshuffle=False, handler=wds.reraise_exception):
        key, url = raw["__key__"], raw.get("__url__", "?")
        if FIELD_MASK not in raw:
            raise ShardError(f"{url}: sample {key} has no {FIELD_MASK} (not a maskgen mask shard)")
        if require_images and FIELD_IMAGE not in raw:
            raise ShardError(f"{url}: sample {key} has no image (built with --image-format none)")
        image = None
        if FIELD_IMAGE in raw:
            with Image.open(io.BytesIO(raw[FIELD_IMAGE])) as im:
                image = np.asarray(im.convert("RGB"))
        meta = decode_meta(raw[FIELD_META]) if FIELD_META in raw else {}
        label = decode_class(raw[FIELD_CLASS]) if FIELD_CLASS in raw else meta.get("label")
        yield Sample(key, image, decode_mask_png(raw[FIELD_MASK]), label, meta)


def summarize(urls: Sequence[str]) -> dict[str, Any]:
    """Counts a trainer needs to know before it starts: samples, labels, mask statistics."""
    n = 0
    labels: dict[int, int] = {}
    fg = []
    statuses: dict[str, int] = {}
    has_images = True
    for s in iter_samples(urls, require_images=False):
        n += 1
        has_images &= s.image is not None
        if s.label is not None:
            labels[s.label] = labels.get(s.label, 0) + 1
        fg.append(float(s.mask.mean()))
        st = s.meta.get("status", "ok")
        statuses[st] = statuses.get(st, 0) + 1
    if n == 0:
        raise ShardError(f"{urls[0]}: the shards hold no samples")
    return {
        "shards": len(urls),
        "samples": n,
        "images": has_images,
        "classes": len(labels),
        "samples_per_class": {str(k): v for k, v in sorted(labels.items())},
        "fg_fraction_mean": float(np.mean(fg)),
        "fg_fraction_min": float(np.min(fg)),
        "fg_fraction_max": float(np.max(fg)),
        "mask_status": dict(sorted(statuses.items())),
    }


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)
