"""Decoded image+mask samples in shard order, for ``sslmask inspect`` and evaluation.

Shards are read with ``webdataset``; nothing in a shard is ever unpickled.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from maskio.errors import ShardError
from maskio.shard_format import (
    FIELD_CLASS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    decode_class,
    decode_mask_png,
    decode_meta,
)


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
