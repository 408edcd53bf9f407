"""One shard of a build: read, decode, predict, post-process, write tar, write stats.

``process_shard`` is a pure function of its arguments (no clocks or randomness reach the
tar), which is what makes shards byte-identical across worker counts, retries and resumed
builds. It runs inside a Ray task, or in-process for tests and debugging.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import heapq
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from maskgen.groundtruth import fit_to_shape
from maskgen.imaging import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    decode_image,
    encode_gray_png,
    encode_jpeg,
    encode_mask_png,
)
from maskgen.methods import SaliencyMethod, make_method
from maskgen.metrics import MetricSums
from maskgen.postprocess import PostprocessConfig, binarize
from maskgen.sources import ItemRef, Source, make_source
from maskgen.tarwriter import DeterministicTarWriter, file_md5
from maskio.atomic import atomic_open, write_json
from maskio.shard_format import (
    FIELD_CLASS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    FIELD_SALIENCY,
    SHARDS_DIR,
    shard_name,
    stats_name,
)

FG_HIST_BINS = 20
N_EXTREMES = 8  # best and worst IoUs kept per shard for the report


@dataclass(frozen=True)
class BuildSpec:
    """Everything a worker needs to process a shard (picklable, JSON-able)."""

    out_dir: str
    source: str
    source_config: dict[str, Any]
    method: str
    method_args: dict[str, Any]  # constructor arguments, as the user gave them
    method_params: dict[str, Any]  # what the method reports (resolved defaults, model checksums)
    postprocess: PostprocessConfig
    image_format: str = "keep"  # keep | jpg | none
    save_saliency: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@functools.lru_cache(maxsize=4)
def _cached_source(name: str, config_json: str) -> Source:
    return make_source(name, json.loads(config_json))


@functools.lru_cache(maxsize=4)
def _cached_method(name: str, params_json: str) -> SaliencyMethod:
    return make_method(name, json.loads(params_json))


def limit_threads() -> None:
    """One thread per worker: parallelism comes from the shards, not from BLAS/OpenCV."""
    cv2.setNumThreads(1)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # for libraries loaded later
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)  # for BLAS/OpenMP pools already loaded


class _Timer:
    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


@dataclass
class _Decoded:
    item: ItemRef
    data: bytes
    image: DecodedImage
    truth: np.ndarray | None = None  # read before the method only for a method that copies it


@dataclass
class ShardStats:
    """What a shard's samples add up to, as they are written: its ``.stats.json``."""

    errors: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)  # usable inputs with a side problem
    status_counts: Counter[str] = field(default_factory=Counter)
    reencoded: int = 0
    gt_resized: int = 0
    fg_sum: float = 0.0
    fg_hist: np.ndarray = field(default_factory=lambda: np.zeros(FG_HIST_BINS, np.int64))
    sums: MetricSums = field(default_factory=MetricSums)
    best: list[tuple[float, str]] = field(default_factory=list)  # min-heap of the highest IoUs
    worst: list[tuple[float, str]] = field(default_factory=list)  # min-heap of the lowest, negated
    runtime: dict[str, Any] = field(default_factory=dict)  # what the method really ran on
    timer: _Timer = field(default_factory=_Timer)

    def error(self, item: ItemRef, stage: str, reason: str, detail: str = "") -> None:
        self.errors.append(
            {"key": item.key, "path": item.path, "stage": stage, "reason": reason, "detail": detail}
        )

    def warning(self, item: ItemRef, stage: str, reason: str, detail: str = "") -> None:
        self.warnings.append(
            {"key": item.key, "path": item.path, "stage": stage, "reason": reason, "detail": detail}
        )

    def add_mask(self, fg_fraction: float, status: str) -> None:
        self.fg_sum += fg_fraction
        self.fg_hist[min(int(fg_fraction * FG_HIST_BINS), FG_HIST_BINS - 1)] += 1
        self.status_counts[status] += 1

    def add_iou(self, value: float, key: str) -> None:
        push_extremes(self.best, self.worst, value, key)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_errors": len(self.errors),
            "errors": self.errors,
            "errors_by_reason": dict(Counter(e["reason"] for e in self.errors)),
            "warnings": self.warnings,
            "status_counts": dict(self.status_counts),
            "reencoded": self.reencoded,
            "gt_resized": self.gt_resized,
            "fg_fraction_sum": self.fg_sum,
            "fg_fraction_hist": self.fg_hist.tolist(),
            "metrics": self.sums.to_json(),
            "best_iou": sorted(((v, k) for v, k in self.best), reverse=True),
            "worst_iou": sorted((-v, k) for v, k in self.worst),
            "seconds": {k: round(v, 4) for k, v in sorted(self.timer.seconds.items())},
            "runtime": self.runtime,
        }  # fmt: skip


def process_shard(spec: BuildSpec, shard_index: int, items: list[ItemRef]) -> dict[str, Any]:
    """Build shard ``shard_index`` from ``items``; returns (and writes) its stats."""
    limit_threads()
    started = time.time()
    source = _cached_source(spec.source, json.dumps(spec.source_config, sort_keys=True))
    method = _cached_method(spec.method, json.dumps(spec.method_args, sort_keys=True))
    if method.params != spec.method_params:  # e.g. a model file changed since the plan was made
        raise RuntimeError(f"method parameters changed since the build was planned: {method.params}")
    stats = ShardStats()
    # a method that decodes JPEGs itself gets plain JPEGs undecoded, unless every image is re-encoded
    pixels = not (method.decodes_jpeg and spec.image_format != "jpg")
    shards_dir = Path(spec.out_dir) / SHARDS_DIR
    tar_path = shards_dir / shard_name(shard_index)
    with atomic_open(tar_path, "wb") as f:
        writer = DeterministicTarWriter(f)
        for start in range(0, len(items), method.batch_size):
            batch = _read_batch(source, items[start : start + method.batch_size], spec, pixels, stats)
            if not batch:
                continue
            if method.reads_ground_truth:
                with stats.timer("ground_truth"):
                    for dec in batch:
                        dec.truth = _ground_truth(source, dec.item, stats.warning)
            with stats.timer("method"):
                maps = _predict(method, batch, stats.error)
            stats.runtime = method.runtime_params()
            params = {**method.params, **stats.runtime}
            for dec, sal in zip(batch, maps, strict=True):
                if sal is not None:
                    fields = _sample(spec, source, dec, sal, params, stats)
                    with stats.timer("write"):
                        writer.write_sample(dec.item.key, fields)
        _refuse_if_the_method_failed_everywhere(stats, writer.nsamples)
        writer.close()
        nsamples = writer.nsamples

    out = {
        "shard": shard_index,
        "tar": shard_name(shard_index),
        "fingerprint": spec.fingerprint,
        "n_items": len(items),
        "nsamples": nsamples,
        **stats.to_json(),
        "duration": round(time.time() - started, 4),
        "started": started,
        "filesize": tar_path.stat().st_size,
        "md5sum": file_md5(tar_path),
        "hostname": os.uname().nodename,
        **_ray_placement(),
    }
    write_json(shards_dir / stats_name(shard_index), out)
    return out


class MethodFailedError(RuntimeError):
    """Every image that reached the method failed there for one reason: the method's setting
    (a broken head, a parameter out of range), not the images, is at fault."""


def _refuse_if_the_method_failed_everywhere(stats: ShardStats, nsamples: int) -> None:
    """Fail the shard (nothing is written, it is not marked done, the build exits non-zero)
    instead of recording every image as skipped and calling an empty build a success."""
    failed = [e for e in stats.errors if e["stage"] == "method"]
    reasons = {(e["reason"], e["detail"]) for e in failed}
    if nsamples == 0 and failed and len(reasons) == 1:
        reason, detail = reasons.pop()
        raise MethodFailedError(f"the method failed on all {len(failed)} images ({reason}: {detail})")


def _read_batch(
    source: Source, items: list[ItemRef], spec: BuildSpec, pixels: bool, stats: ShardStats
) -> list[_Decoded]:
    """Read and decode ``items``; an unreadable or undecodable one is recorded and left out."""
    batch: list[_Decoded] = []
    for item in items:
        try:
            with stats.timer("read"):
                data = source.read(item)
        except OSError as exc:
            stats.error(item, "read", "unreadable", exc.strerror or str(exc))
            continue
        try:
            with stats.timer("decode"):
                image = decode_image(data, spec.max_pixels, pixels)
        except ImageDecodeError as exc:
            stats.error(item, "decode", exc.reason, exc.detail)
            continue
        batch.append(_Decoded(item, data, image))
    return batch


def _sample(
    spec: BuildSpec, source: Source, dec: _Decoded, sal: np.ndarray, params: dict[str, Any], stats: ShardStats
) -> dict[str, bytes]:
    """One sample's files: post-process the map, score it against ground truth, encode."""
    item = dec.item
    h, w = dec.image.shape
    with stats.timer("postprocess"):
        result = binarize(sal, spec.postprocess)
    fg = result.mask > 0
    fg_fraction = float(np.count_nonzero(fg)) / fg.size
    stats.add_mask(fg_fraction, result.status)
    sample_iou = None
    with stats.timer("metrics"):
        gt = dec.truth if dec.truth is not None else _ground_truth(source, item, stats.warning)
        if gt is not None:
            stats.gt_resized += gt.shape != (h, w)
            sample_iou = stats.sums.add(fg, result.saliency_u8, fit_to_shape(gt, (h, w)))
            stats.add_iou(sample_iou, item.key)
    with stats.timer("encode"):
        fields: dict[str, bytes] = {}
        is_reencoded = False
        if spec.image_format != "none":
            if spec.image_format == "keep" and dec.image.reencode_reason is None:
                fields[FIELD_IMAGE] = dec.data
            else:
                assert dec.image.rgb is not None  # decoded: re-encoding needs the pixels
                fields[FIELD_IMAGE] = encode_jpeg(dec.image.rgb, dec.image.grayscale)
                is_reencoded = True
                stats.reencoded += 1
        fields[FIELD_MASK] = encode_mask_png(result.mask)
        if spec.save_saliency:
            fields[FIELD_SALIENCY] = encode_gray_png(result.saliency_u8)
        if source.class_names is not None:
            fields[FIELD_CLASS] = str(item.label if item.label is not None else -1).encode()
        meta = {
            "key": item.key,
            "source": spec.source,
            "path": item.path,
            "source_sha256": hashlib.sha256(dec.data).hexdigest(),
            "width": w,
            "height": h,
            "label": item.label,
            "method": spec.method,
            "method_params": params,
            "threshold": result.threshold,
            "fg_fraction": fg_fraction,
            "iou": sample_iou,
            "status": result.status,
            "reencoded": is_reencoded,
        }
        fields[FIELD_META] = json.dumps(meta).encode("utf-8")
    return fields


def _ray_placement() -> dict[str, Any]:
    """The Ray node this shard ran on and the resources Ray gave its task (None outside Ray):
    shows how work spread over a cluster, and whether a GPU share was really granted."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {"ray_node_id": None, "ray_resources": None}
    context = ray.get_runtime_context()
    return {"ray_node_id": context.get_node_id(), "ray_resources": context.get_assigned_resources()}


def _predict(method: SaliencyMethod, batch: list[_Decoded], record_error) -> list[np.ndarray | None]:
    """Batched prediction; on failure retry one image at a time so one bad input costs one image."""

    def run(decoded: list[_Decoded]) -> list[np.ndarray | None]:
        if method.reads_ground_truth:
            maps = method.predict_with_truth([d.image.rgb for d in decoded], [d.truth for d in decoded])
        elif method.decodes_jpeg:
            maps = method.predict_encoded([d.data if d.image.rgb is None else d.image.rgb for d in decoded])
        else:
            maps = method.predict([d.image.rgb for d in decoded])
        return [_check_map(m, d.image.shape) for m, d in zip(maps, decoded, strict=True)]

    try:
        return run(batch)
    except Exception:
        pass
    out: list[np.ndarray | None] = []
    for d in batch:
        try:
            out.append(run([d])[0])
        except ImageDecodeError as exc:  # a method that decodes JPEGs itself refused this one
            record_error(d.item, "decode", exc.reason, exc.detail)
            out.append(None)
        except Exception as exc:
            record_error(d.item, "method", type(exc).__name__, str(exc)[:200])
            out.append(None)
    return out


def _check_map(sal: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if sal.shape != tuple(shape):
        raise ValueError(f"saliency map shape {sal.shape} != image shape {tuple(shape)}")
    sal = np.asarray(sal, np.float32)
    if not (np.isfinite(sal).all() and sal.min() >= 0.0 and sal.max() <= 1.0):
        sal = np.clip(np.nan_to_num(sal, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return sal


def _ground_truth(source: Source, item: ItemRef, record_warning) -> np.ndarray | None:
    try:
        return source.ground_truth(item)
    except (OSError, ImageDecodeError, ValueError) as exc:
        record_warning(item, "ground_truth", "bad_ground_truth", str(exc)[:200])
        return None


def push_extremes(best: list, worst: list, value: float, key: str) -> None:
    """Keep the N_EXTREMES highest (``best``) and lowest (``worst``, negated) IoUs: bounded memory."""
    for heap, entry in ((best, (value, key)), (worst, (-value, key))):
        if len(heap) < N_EXTREMES:
            heapq.heappush(heap, entry)
        else:
            heapq.heappushpop(heap, entry)
