"""``maskgen eval OUT``: recompute the report from the shards themselves.

Ground truth comes from the build's own source (as recorded in the manifest) or from a
folder of masks given with ``--gt`` (``maskgen.groundtruth``).
The SOD metrics use the stored soft map (``sal.png``) when the build kept one, else the
binary mask; ``report.json`` says which in ``sod_input``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from maskgen.groundtruth import GroundTruthLookup, fit_to_shape
from maskgen.metrics import MetricSums
from maskgen.pipeline import BuildError
from maskgen.report import aggregate, throughput, write_build_outputs
from maskgen.sources import SourceError
from maskgen.worker import N_EXTREMES, push_extremes
from maskio.errors import ShardFormatError
from maskio.metadata import read_manifest
from maskio.shard_format import (
    FIELD_MASK,
    FIELD_META,
    FIELD_SALIENCY,
    MANIFEST,
    SHARDS_DIR,
    check_mask_shape,
    decode_gray_png,
    decode_mask_png,
    decode_meta,
    in_sample,
    iter_tar_samples,
    shard_name,
)


def check_same_size(mask: np.ndarray, soft: np.ndarray, meta: dict[str, Any]) -> None:
    """The mask, its saliency map and the image the json describes share one size (a mask of
    another size would be scored against a resized ground truth, some metrics as NaN)."""
    check_mask_shape(mask, meta)
    if soft.shape != mask.shape:
        raise ShardFormatError(f"{FIELD_SALIENCY}: {soft.shape[1]}x{soft.shape[0]}, its mask "
                               f"{mask.shape[1]}x{mask.shape[0]}")  # fmt: skip


def _scored_sample(shard, key: str, fields: dict[str, bytes], gt_of: GroundTruthLookup):
    """``(mask, soft map, ground truth at the mask's size, soft map stored?)`` of one sample, or
    None when it has no ground truth."""
    with in_sample(shard, key):
        if FIELD_META not in fields or FIELD_MASK not in fields:
            raise ShardFormatError(f"no {FIELD_META if FIELD_META not in fields else FIELD_MASK}")
        meta = decode_meta(fields[FIELD_META])
        gt = gt_of(meta.get("path") or "")
        if gt is None:
            return None
        mask = decode_mask_png(fields[FIELD_MASK])
        has_sal = FIELD_SALIENCY in fields
        soft = decode_gray_png(fields[FIELD_SALIENCY]) if has_sal else mask.astype(np.uint8) * 255
        check_same_size(mask, soft, meta)
    return mask, soft, fit_to_shape(gt, mask.shape), has_sal


def evaluate_shards(specs: list[str], gt_dir: str) -> dict[str, Any]:
    """Mask quality of any shards (a published dataset: ``hf://`` or its snapshot folder) against
    the ground truth in ``gt_dir``; reads only, writes no report (the shards are not a build)."""
    from maskio.records import resolve_shards

    gt_of = GroundTruthLookup(gt_dir=gt_dir)
    sums = MetricSums()
    n = 0
    for shard in resolve_shards(specs):
        for key, fields in iter_tar_samples(shard, {FIELD_MASK, FIELD_SALIENCY, FIELD_META}):
            n += 1
            scored = _scored_sample(shard, key, fields, gt_of)
            if scored is not None:
                sums.add(*scored[:3])
    return {"n_images": n, "n_with_gt": sums.n, **sums.results()}


def check_shards_match_stats(out: Path, index: list[dict[str, Any]]) -> None:
    """Each shard is the file its stats describe (size): a shard swapped or truncated after the
    build would otherwise rewrite report.json from what is left."""
    for entry in index:
        path = out / entry["url"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["filesize"]:
            found = "missing" if size is None else f"{size} bytes"
            raise BuildError(f"{path}: {found}, its stats say {entry['filesize']} bytes; "
                             "the shard was replaced after the build (rebuild it)")  # fmt: skip


def evaluate_build(out: str | os.PathLike, gt_dir: str | None = None) -> dict[str, Any]:
    out = Path(out)
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise BuildError(f"{out}: not a maskgen build (no {MANIFEST})")
    manifest = read_manifest(manifest_path)
    if not manifest.get("complete"):
        raise BuildError(f"{out}: the build is not complete; run maskgen build again to finish it")
    try:
        gt_of = GroundTruthLookup.from_manifest(manifest, gt_dir)
    except SourceError as exc:
        raise BuildError(
            f"cannot reopen the build's source for ground truth ({exc}); give --gt DIR"
        ) from None
    agg = aggregate(out, manifest["n_shards"])
    check_shards_match_stats(out, agg.index)
    sums = MetricSums()
    best: list[tuple[float, str]] = []
    worst: list[tuple[float, str]] = []
    agg.shard_of_key = {}
    used_saliency = None
    for i in range(manifest["n_shards"]):
        shard_best: list[tuple[float, str]] = []  # per shard, exactly as the build keeps them
        shard_worst: list[tuple[float, str]] = []
        fields_wanted = {FIELD_MASK, FIELD_SALIENCY, FIELD_META}
        shard = out / SHARDS_DIR / shard_name(i)
        seen = 0
        for key, fields in iter_tar_samples(shard, fields_wanted):
            seen += 1
            scored = _scored_sample(shard, key, fields, gt_of)
            if scored is None:
                continue
            mask, soft, gt, has_sal = scored
            used_saliency = has_sal if used_saliency is None else used_saliency and has_sal
            push_extremes(shard_best, shard_worst, sums.add(mask, soft, gt), key)
        if seen != agg.index[i]["nsamples"]:
            raise BuildError(f"{shard}: holds {seen} samples, its stats say {agg.index[i]['nsamples']}; "
                             "the shard was replaced after the build (rebuild it)")  # fmt: skip
        kept = shard_best + [(-v, k) for v, k in shard_worst]
        agg.shard_of_key.update((k, i) for _, k in kept)
        best.extend(shard_best)
        worst.extend(kept[len(shard_best) :])
    agg.metrics = sums
    agg.best = sorted(best, key=lambda t: (-t[0], t[1]))[:N_EXTREMES]
    agg.worst = sorted(worst, key=lambda t: (t[0], t[1]))[:N_EXTREMES]
    sod_input = "saliency" if used_saliency else "mask"
    return write_build_outputs(out, manifest, agg, throughput(manifest), sod_input, gt_of)
