"""Build summaries: ``errors.jsonl``, ``index.json``, ``report.json`` and ``report.html``.

Everything here is derived from the per-shard stats files (plus a few samples read back
for thumbnails), so a resumed build reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image

from maskgen.groundtruth import GroundTruthLookup, safe_lookup
from maskgen.metrics import MetricSums
from maskgen.templating import template
from maskgen.worker import N_EXTREMES
from maskio.atomic import atomic_open, write_json
from maskio.errors import ShardFormatError
from maskio.metadata import read_shard_stats
from maskio.shard_format import (
    ERRORS,
    FIELD_IMAGE,
    FIELD_MASK,
    FIELD_META,
    INDEX,
    REPORT_HTML,
    REPORT_JSON,
    SHARDS_DIR,
    decode_mask_png,
    decode_meta,
    in_sample,
    iter_tar_samples,
    open_limited,
    shard_name,
    stats_name,
)

N_GRID = 24
THUMB = 160
MAX_ERRORS_SHOWN = 200


@dataclass
class Aggregate:
    n_shards: int = 0
    n_samples: int = 0
    n_errors: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    errors_by_reason: Counter[str] = field(default_factory=Counter)
    status_counts: Counter[str] = field(default_factory=Counter)
    reencoded: int = 0
    fg_fraction_sum: float = 0.0
    fg_hist: np.ndarray = field(default_factory=lambda: np.zeros(20, np.int64))
    metrics: MetricSums = field(default_factory=MetricSums)
    best: list[tuple[float, str]] = field(default_factory=list)
    worst: list[tuple[float, str]] = field(default_factory=list)
    shard_of_key: dict[str, int] = field(default_factory=dict)
    seconds: Counter[str] = field(default_factory=Counter)
    runtime: Counter[str] = field(default_factory=Counter)  # shards per (device, dtype) as JSON
    index: list[dict[str, Any]] = field(default_factory=list)

    def ran_on(self) -> list[dict[str, Any]]:
        """``[{"device": "cuda", "dtype": "bf16", "shards": 12}]``; empty for device-less methods."""
        return [{**json.loads(k), "shards": n} for k, n in sorted(self.runtime.items())]


def aggregate(out: Path, n_shards: int) -> Aggregate:
    """Add up the stats files of shards 0 .. n_shards-1 (in order: deterministic output)."""
    agg = Aggregate(n_shards=n_shards)
    for i in range(n_shards):
        st = read_shard_stats(out / SHARDS_DIR / stats_name(i))
        agg.n_samples += st["nsamples"]
        agg.n_errors += st["n_errors"]
        agg.errors.extend(st["errors"])
        agg.warnings.extend(st.get("warnings", []))
        agg.errors_by_reason.update(st["errors_by_reason"])
        agg.status_counts.update(st["status_counts"])
        agg.reencoded += st["reencoded"]
        agg.fg_fraction_sum += st["fg_fraction_sum"]
        agg.fg_hist = agg.fg_hist + np.asarray(st["fg_fraction_hist"], np.int64)
        agg.metrics.merge(MetricSums.from_json(st["metrics"]))
        for _v, k in st["best_iou"] + st["worst_iou"]:
            agg.shard_of_key[k] = i
        agg.best.extend((float(v), k) for v, k in st["best_iou"])
        agg.worst.extend((float(v), k) for v, k in st["worst_iou"])
        agg.seconds.update(st.get("seconds", {}))
        if st.get("runtime"):
            agg.runtime[json.dumps(st["runtime"], sort_keys=True)] += 1
        agg.index.append({
            "url": f"{SHARDS_DIR}/{shard_name(i)}",
            "nsamples": st["nsamples"],
            "filesize": st["filesize"],
            "md5sum": st["md5sum"],
        })  # fmt: skip
    agg.best = sorted(agg.best, key=lambda t: (-t[0], t[1]))[:N_EXTREMES]
    agg.worst = sorted(agg.worst, key=lambda t: (t[0], t[1]))[:N_EXTREMES]
    return agg


def throughput(manifest: dict[str, Any]) -> float | None:
    """Images per second over every run that built shards (a resumed build counts all its runs)."""
    runs = [r for r in manifest.get("runs", []) if r.get("images")]
    images = sum(r["images"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return images / seconds if images and seconds > 0 else None


def make_report(
    manifest: dict[str, Any], agg: Aggregate, images_per_second: float | None, sod_input: str = "saliency"
) -> dict[str, Any]:
    """report.json: the contract keys first, then the extras."""
    m = agg.metrics.results()
    return {
        "n_images": agg.n_samples,
        "n_errors": agg.n_errors,
        "miou": m["miou"],
        "mae": m["mae"],
        "max_fbeta": m["max_fbeta"],
        "s_measure": m["s_measure"],
        "e_measure": m["e_measure"],
        "fg_fraction_mean": agg.fg_fraction_sum / agg.n_samples if agg.n_samples else None,
        "images_per_second": images_per_second,
        "method": manifest["method"],
        "method_params": manifest["method_params"],
        # extras
        "n_with_gt": agg.metrics.n,
        "dataset_iou": m["dataset_iou"],
        "mean_fbeta": m["mean_fbeta"],
        "max_e_measure": m["max_e_measure"],
        "weighted_f": m["weighted_f"],
        "sod_input": sod_input,
        "threshold": manifest.get("threshold"),
        "source": manifest["source"],
        "n_shards": agg.n_shards,
        "status_counts": dict(sorted(agg.status_counts.items())),
        "errors_by_reason": dict(sorted(agg.errors_by_reason.items())),
        "n_reencoded": agg.reencoded,
        "fg_fraction_hist": agg.fg_hist.tolist(),
        "best_iou": [{"key": k, "iou": v} for v, k in agg.best],
        "worst_iou": [{"key": k, "iou": v} for v, k in agg.worst],
        "worker_seconds_by_stage": {k: round(v, 3) for k, v in sorted(agg.seconds.items())},
        "task_resources": manifest.get("task_resources"),
        "ran_on": agg.ran_on(),
    }


def gpu_fallback_shards(report: dict[str, Any]) -> int:
    """Shards that ran on the CPU although the plan asked Ray for a GPU share for each."""
    if not (report.get("task_resources") or {}).get("num_gpus"):
        return 0
    return sum(r["shards"] for r in report.get("ran_on", []) if r.get("device") == "cpu")


def describe_runtime(report: dict[str, Any]) -> str:
    """``cuda bf16 (12 shards)``, or "" for a method that has no device to choose."""
    return ", ".join(
        " ".join(str(v) for k, v in sorted(r.items()) if k != "shards") + f" ({r['shards']} shards)"
        for r in report.get("ran_on", [])
    )


def write_build_outputs(
    out: Path,
    manifest: dict[str, Any],
    agg: Aggregate,
    images_per_second: float | None,
    sod_input: str = "saliency",
    gt_of: GroundTruthLookup | None = None,
) -> dict[str, Any]:
    """Write errors.jsonl, index.json, report.json and report.html; returns the report."""
    with atomic_open(out / ERRORS, "w") as f:
        for e in agg.errors:
            f.write(json.dumps(e) + "\n")
    write_json(out / INDEX, {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": agg.index})
    report = make_report(manifest, agg, images_per_second, sod_input)
    write_json(out / REPORT_JSON, report)
    with atomic_open(out / REPORT_HTML, "w") as f:
        f.write(render_html(out, manifest, report, agg, gt_of or safe_lookup(manifest)))
    return report


# ---------------------------------------------------------------------------------- HTML


def _outline(m: np.ndarray) -> np.ndarray:
    pad = np.pad(m, 1, mode="edge")
    return (m ^ pad[1:-1, 2:]) | (m ^ pad[2:, 1:-1])


def _thumbnail(fields: dict[str, bytes], gt: np.ndarray | None = None) -> str:
    """Image with the mask in red (outline yellow) and the ground truth's outline in green."""
    if FIELD_MASK not in fields:
        raise ShardFormatError(f"no {FIELD_MASK}")
    mask = decode_mask_png(fields[FIELD_MASK])
    if FIELD_IMAGE in fields:
        try:
            with open_limited(fields[FIELD_IMAGE], FIELD_IMAGE) as im:
                rgb = np.asarray(im.convert("RGB")).astype(np.float32)
        except ShardFormatError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt data
            raise ShardFormatError(f"{FIELD_IMAGE}: cannot decode image ({type(exc).__name__})") from None
    else:
        rgb = np.full(mask.shape + (3,), 128, np.float32)
    scale = THUMB / max(mask.shape)
    size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
    rgb = np.asarray(Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.BILINEAR)).astype(np.float32)
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    rgb[m] = 0.55 * rgb[m] + 0.45 * np.array([230, 30, 30], np.float32)
    rgb[_outline(m)] = (255, 255, 0)
    if gt is not None and gt.shape == mask.shape:
        g = np.asarray(Image.fromarray(gt.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
        rgb[_outline(g)] = (0, 230, 60)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _collect_thumbnails(
    out: Path, agg: Aggregate, keys_wanted: set[str], gt_of: GroundTruthLookup
) -> tuple[list[str], dict[str, tuple[str, dict]]]:
    """Read back the first N_GRID samples and the wanted keys (only the shards holding them)."""
    found: dict[str, tuple[str, dict]] = {}
    first: list[str] = []
    shards_needed = {agg.shard_of_key[k] for k in keys_wanted if k in agg.shard_of_key}
    for i in range(agg.n_shards):
        need_first = len(first) < N_GRID
        if not need_first and i not in shards_needed:
            continue
        shard = out / SHARDS_DIR / shard_name(i)
        for key, fields in iter_tar_samples(shard):
            take_first = len(first) < N_GRID
            if take_first or key in keys_wanted:
                with in_sample(shard, key):
                    meta = decode_meta(fields.get(FIELD_META, b"{}"))
                    gt = gt_of(meta.get("path") or "") if meta.get("iou") is not None else None
                    found[key] = (_thumbnail(fields, gt), meta)
                if take_first:
                    first.append(key)
            if len(first) >= N_GRID and i not in shards_needed:
                break
    return first, found


def _figure(thumb: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"src": thumb, "key": meta["key"], "fg": meta["fg_fraction"], "iou": meta.get("iou"),
            "status": meta.get("status", "ok")}  # fmt: skip


def _histogram(hist: list[int], width: int = 400, height: int = 120) -> dict[str, Any]:
    """The foreground-fraction histogram's bars, in SVG coordinates."""
    top, n = max(hist) or 1, len(hist)
    bars = [{"x": i * width / n, "y": height - c / top * (height - 15), "w": width / n - 2,
             "h": c / top * (height - 15), "low": i / n, "high": (i + 1) / n, "count": c}
            for i, c in enumerate(hist)]  # fmt: skip
    return {"width": width, "height": height, "bars": bars}


def _template() -> jinja2.Template:
    """report.html's template (autoescaped: ``maskgen.templating``)."""
    return template("report.html")


def render_html(
    out: Path, manifest: dict[str, Any], report: dict[str, Any], agg: Aggregate, gt_of: GroundTruthLookup
) -> str:
    keys_wanted = {k for _, k in agg.best} | {k for _, k in agg.worst}
    first, thumbs = _collect_thumbnails(out, agg, keys_wanted, gt_of)

    def fmt(v: Any) -> str:
        if v is None:
            return "n/a"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [
        ("images", report["n_images"]),
        ("skipped inputs", report["n_errors"]),
        ("images with ground truth", report["n_with_gt"]),
        ("mIoU (mean of per-image IoU)", report["miou"]),
        ("dataset IoU", report["dataset_iou"]),
        ("MAE", report["mae"]),
        ("max F-beta (β²=0.3)", report["max_fbeta"]),
        ("S-measure", report["s_measure"]),
        ("E-measure (mean)", report["e_measure"]),
        ("weighted F", report["weighted_f"]),
        ("mean foreground fraction", report["fg_fraction_mean"]),
        ("images / second", report["images_per_second"]),
        ("SOD metrics computed on", report["sod_input"]),
    ]
    return (
        _template().render(
            name=out.name,
            thumb=THUMB,
            source=f"{manifest['source']} {json.dumps(manifest.get('source_config', {}))}",
            method=f"{manifest['method']} {json.dumps(manifest['method_params'])}",
            threshold=str(manifest.get("threshold")),
            ran_on=describe_runtime(report) if report.get("ran_on") else "",
            fallback_shards=gpu_fallback_shards(report) if report.get("ran_on") else 0,
            version=manifest["versions"]["maskgen"],
            commit=str(manifest.get("git_commit")),
            rows=[(label, fmt(value)) for label, value in rows],
            status_counts=list(report["status_counts"].items()),
            hist=_histogram(report["fg_fraction_hist"]),
            first=[_figure(*thumbs[k]) for k in first if k in thumbs],
            best=[_figure(*thumbs[k]) for _, k in agg.best if k in thumbs],
            worst=[_figure(*thumbs[k]) for _, k in agg.worst if k in thumbs],
            n_errors=len(agg.errors),
            errors=agg.errors[:MAX_ERRORS_SHOWN],
            more=max(0, len(agg.errors) - MAX_ERRORS_SHOWN),
            errors_file=ERRORS,
        )
        + "\n"
    )
