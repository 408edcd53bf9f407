"""One shard of a build: read, decode, predict, post-process, write tar, write stats.

``process_shard`` is a pure function of its arguments (no clocks or randomness reach the
tar), which is what makes shards byte-identical across worker counts, retries and resumed
builds. It runs inside a Ray task, or in-process for tests and debugging.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from maskgen.atomic import atomic_open, write_json
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
from maskgen.shard_format import (
    FIELD_CLASS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    FIELD_SALIENCY,
    SHARDS_DIR,
    shard_name,
    stats_name,
)
from maskgen.sources import ItemRef, Source, make_source
from maskgen.tarwriter import DeterministicTarWriter, file_md5

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


def process_shard(spec: BuildSpec, shard_index: int, items: list[ItemRef]) -> dict[str, Any]:
    """Build shard ``shard_index`` from ``items``; returns (and writes) its stats."""
    limit_threads()
    started = time.time()
    timer = _Timer()
    source = _cached_source(spec.source, json.dumps(spec.source_config, sort_keys=True))
    method = _cached_method(spec.method, json.dumps(spec.method_args, sort_keys=True))
    if method.params != spec.method_params:  # e.g. a model file changed since the plan was made
        raise RuntimeError(f"method parameters changed since the build was planned: {method.params}")
    has_labels = source.class_names is not None

    shards_dir = Path(spec.out_dir) / SHARDS_DIR
    tar_path = shards_dir / shard_name(shard_index)
    errors: list[dict[str, str]] = []
    status_counts: Counter[str] = Counter()
    reencoded = 0
    fg_sum = 0.0
    fg_hist = np.zeros(FG_HIST_BINS, np.int64)
    sums = MetricSums()
    best: list[tuple[float, str]] = []  # min-heap of the highest IoUs
    worst: list[tuple[float, str]] = []  # min-heap of the lowest IoUs (negated)
    gt_resized = 0

    warnings: list[dict[str, str]] = []  # usable inputs with a problem on the side (bad ground truth)

    def record_error(item: ItemRef, stage: str, reason: str, detail: str = "") -> None:
        errors.append(
            {"key": item.key, "path": item.path, "stage": stage, "reason": reason, "detail": detail}
        )

    def record_warning(item: ItemRef, stage: str, reason: str, detail: str = "") -> None:
        warnings.append(
            {"key": item.key, "path": item.path, "stage": stage, "reason": reason, "detail": detail}
        )

    # a method that decodes JPEGs itself gets plain JPEGs undecoded, unless every image is re-encoded
    pixels = not (method.decodes_jpeg and spec.image_format != "jpg")
    with atomic_open(tar_path, "wb") as f:
        writer = DeterministicTarWriter(f)
        for start in range(0, len(items), method.batch_size):
            batch: list[_Decoded] = []
            for item in items[start : start + method.batch_size]:
                try:
                    with timer("read"):
                        data = source.read(item)
                except OSError as exc:
                    record_error(item, "read", "unreadable", exc.strerror or str(exc))
                    continue
                try:
                    with timer("decode"):
                        image = decode_image(data, spec.max_pixels, pixels)
                except ImageDecodeError as exc:
                    record_error(item, "decode", exc.reason, exc.detail)
                    continue
                batch.append(_Decoded(item, data, image))
            if not batch:
                continue
            with timer("method"):
                maps = _predict(method, batch, record_error)
            for dec, sal in zip(batch, maps, strict=True):
                if sal is None:
                    continue
                item, rgb = dec.item, dec.image.rgb
                h, w = dec.image.shape
                with timer("postprocess"):
                    result = binarize(sal, spec.postprocess)
                    sal_u8 = result.saliency_u8
                fg = result.mask > 0
                fg_fraction = float(np.count_nonzero(fg)) / fg.size
                fg_sum += fg_fraction
                fg_hist[min(int(fg_fraction * FG_HIST_BINS), FG_HIST_BINS - 1)] += 1
                status_counts[result.status] += 1

                sample_iou = None
                with timer("metrics"):
                    gt = _ground_truth(source, item, record_warning)
                    if gt is not None:
                        gt_resized += gt.shape != (h, w)
                        gt = fit_to_shape(gt, (h, w))
                        sample_iou = sums.add(fg, sal_u8, gt)
                        push_extremes(best, worst, sample_iou, item.key)

                with timer("encode"):
                    fields: dict[str, bytes] = {}
                    is_reencoded = False
                    if spec.image_format != "none":
                        if spec.image_format == "keep" and dec.image.reencode_reason is None:
                            fields[FIELD_IMAGE] = dec.data
                        else:
                            assert rgb is not None  # decoded: re-encoding needs the pixels
                            fields[FIELD_IMAGE] = encode_jpeg(rgb, dec.image.grayscale)
                            is_reencoded = True
                            reencoded += 1
                    fields[FIELD_MASK] = encode_mask_png(result.mask)
                    if spec.save_saliency:
                        fields[FIELD_SALIENCY] = encode_gray_png(sal_u8)
                    if has_labels:
                        fields[FIELD_CLASS] = str(item.label if item.label is not None else -1).encode()
                    meta = {
                        "key": item.key,
                        "source": spec.source,
                        "path": item.path,
                        "width": w,
                        "height": h,
                        "label": item.label,
                        "method": spec.method,
                        "method_params": method.params,
                        "threshold": result.threshold,
                        "fg_fraction": fg_fraction,
                        "iou": sample_iou,
                        "status": result.status,
                        "reencoded": is_reencoded,
                    }
                    fields[FIELD_META] = json.dumps(meta).encode("utf-8")
                with timer("write"):
                    writer.write_sample(item.key, fields)
        writer.close()
        nsamples = writer.nsamples

    stats = {
        "shard": shard_index,
        "tar": shard_name(shard_index),
        "fingerprint": spec.fingerprint,
        "n_items": len(items),
        "nsamples": nsamples,
        "n_errors": len(errors),
        "errors": errors,
        "errors_by_reason": dict(Counter(e["reason"] for e in errors)),
        "warnings": warnings,
        "status_counts": dict(status_counts),
        "reencoded": reencoded,
        "gt_resized": gt_resized,
        "fg_fraction_sum": fg_sum,
        "fg_fraction_hist": fg_hist.tolist(),
        "metrics": sums.to_json(),
        "best_iou": sorted(((v, k) for v, k in best), reverse=True),
        "worst_iou": sorted((-v, k) for v, k in worst),
        "seconds": {k: round(v, 4) for k, v in sorted(timer.seconds.items())},
        "duration": round(time.time() - started, 4),
        "started": started,
        "filesize": tar_path.stat().st_size,
        "md5sum": file_md5(tar_path),
        "hostname": os.uname().nodename,
        "ray_node_id": _ray_node_id(),
    }
    write_json(shards_dir / stats_name(shard_index), stats)
    return stats


def _ray_node_id() -> str | None:
    """The Ray node this shard ran on (None outside Ray): shows how work spread over a cluster."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def _predict(method: SaliencyMethod, batch: list[_Decoded], record_error) -> list[np.ndarray | None]:
    """Batched prediction; on failure retry one image at a time so one bad input costs one image."""

    def run(decoded: list[_Decoded]) -> list[np.ndarray | None]:
        if method.decodes_jpeg:
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
