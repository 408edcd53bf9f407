"""Decoded image+mask samples in shard order, for ``sslmask inspect`` and evaluation.

Shards are read with ``maskio``'s tar reader (the trainer's rules); nothing in a shard is ever
unpickled.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from maskio.errors import ShardError
from maskio.records import decode_rgb
from maskio.shard_format import (
    FIELD_CLASS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    check_mask_shape,
    decode_class,
    decode_mask_png,
    decode_meta,
    in_sample,
    iter_tar_samples,
)


@dataclass
class Sample:
    key: str
    image: np.ndarray | None  # H x W x 3 uint8 (None for masks-only shards)
    mask: np.ndarray  # H x W bool
    label: int | None
    meta: dict[str, Any]


def iter_samples(urls: Sequence[str], require_images: bool = True) -> Iterator[Sample]:
    """Decoded samples in shard order (no shuffling): for inspection and evaluation. The same
    tar rules as training (regular members only, nothing escapes) and the same field checks."""
    for url in urls:
        try:
            samples = iter_tar_samples(url)
            for key, raw in samples:
                yield _decode_sample(url, key, raw, require_images)
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise ShardError(f"{url}: unreadable shard ({exc})") from None


def _decode_sample(url: str, key: str, raw: dict[str, bytes], require_images: bool) -> Sample:
    if FIELD_MASK not in raw:
        raise ShardError(f"{url}: sample {key} has no {FIELD_MASK} (not a maskgen mask shard)")
    if require_images and FIELD_IMAGE not in raw:
        raise ShardError(f"{url}: sample {key} has no image (built with --image-format none)")
    image = np.asarray(decode_rgb(raw[FIELD_IMAGE], f"{url}: sample {key}")) if FIELD_IMAGE in raw else None
    with in_sample(url, key):
        meta = decode_meta(raw[FIELD_META]) if FIELD_META in raw else {}
        label = decode_class(raw[FIELD_CLASS]) if FIELD_CLASS in raw else meta.get("label")
        mask = decode_mask_png(raw[FIELD_MASK])
        check_mask_shape(mask, meta, image)
    return Sample(key, image, mask, label, meta)


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
