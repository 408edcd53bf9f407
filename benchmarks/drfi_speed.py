"""DRFI speed: each pipeline's time per photo over one skimage felzenszwalb call on the same photo.

    python benchmarks/drfi_speed.py [--photos ecssd|skimage] [--images 20] [--repeats 3]

Inputs: ECSSD photos from ../shared/data resized to ImageNet's typical 500x375, or the four
scikit-image photos (astronaut, coffee, chelsea, rocket). One thread, as a build worker runs.
For every photo, each pipeline and the reference call ``felzenszwalb(scale=1000, sigma=0.8,
min_size=1000)`` are timed in the same run (median of the repeats); the table gives the median
over photos of the ratio, and of the milliseconds. Then where the default recipe's time goes,
and the segmentation alone against three ``cv2.ximgproc`` calls (where the contrib build is
installed), which is what the default recipe ran before the levels shared their graph.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb

from maskgen.methods.drfi.cues import region_cues
from maskgen.methods.drfi.features import pixel_features, region_features
from maskgen.methods.drfi.method import DRFI, level_values
from maskgen.methods.drfi.refine import LevelGraph
from maskgen.methods.drfi.segment import MULTI_LEVELS, segment_levels

ECSSD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ecssd-dev" / "images"


def load_photos(which: str, n: int) -> list[np.ndarray]:
    if which == "skimage":
        import skimage.data

        return [
            skimage.data.astronaut(),
            skimage.data.coffee(),
            skimage.data.chelsea(),
            skimage.data.rocket(),
        ]
    out = []
    for f in sorted(ECSSD.iterdir())[:n]:
        im = np.asarray(Image.open(f).convert("RGB"))
        size = (500, 375) if im.shape[1] >= im.shape[0] else (375, 500)
        out.append(cv2.resize(im, size, interpolation=cv2.INTER_AREA))
    return out


def seconds(fn, image, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(image)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def stage_times(drfi: DRFI, rgb: np.ndarray) -> dict[str, float]:
    """DRFI.saliency's steps, timed one by one (the same calls in the same order)."""
    t = [time.perf_counter()]
    pix = pixel_features(rgb)
    t.append(time.perf_counter())
    labels = segment_levels(rgb, drfi.levels)
    t.append(time.perf_counter())
    described = [region_features(pix, lab) for lab in labels]
    t.append(time.perf_counter())
    feats = [np.concatenate([f, region_cues(st).astype(np.float32)], axis=1) for f, st in described]
    t.append(time.perf_counter())
    scores = [[sc.score(f, st) for sc in drfi.scorers] for f, (_, st) in zip(feats, described, strict=True)]
    t.append(time.perf_counter())
    graph = LevelGraph.build(pix, labels, [st for _, st in described])
    graph.refine([level_values(s) for s in scores])
    t.append(time.perf_counter())
    names = (
        "pixel features",
        "segmentation (3 levels)",
        "region descriptor",
        "background cues",
        "forest",
        "refinement",
    )
    return {k: b - a for k, a, b in zip(names, t[:-1], t[1:], strict=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", choices=("ecssd", "skimage"), default="ecssd")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    photos = load_photos(args.photos, args.images)
    reference = "skimage felzenszwalb (1 call: scale 1000, sigma 0.8, min size 1000)"
    runs = {
        reference: lambda im: felzenszwalb(im, scale=1000, sigma=0.8, min_size=1000),
        "drfi default (3 levels, forest with cues, refine)": DRFI().saliency,
        "drfi harl (1 level), unsupervised forest, no refine": DRFI(
            model="unsupervised", levels="harl", refine=0
        ).saliency,
        "drfi 3 levels, rbd": DRFI(scorer="rbd", refine=0).saliency,
        "drfi multi6 (6 levels), forest with cues, refine": DRFI(levels="multi6").saliency,
        "drfi drfi15 (15 levels), forest with cues, refine": DRFI(levels="drfi15").saliency,
    }
    for fn in runs.values():  # compile and warm every path once
        fn(photos[0])
    ms = {k: [] for k in runs}
    ratio = {k: [] for k in runs}
    for im in photos:
        ref = seconds(runs[reference], im, args.repeats)
        for name, fn in runs.items():
            s = ref if name == reference else seconds(fn, im, args.repeats)
            ms[name].append(1e3 * s)
            ratio[name].append(s / ref)

    h, w = photos[0].shape[:2]
    from machine import describe, drfi_kernels

    print(f"\n{describe()}\n{drfi_kernels()}")
    print(
        f"{len(photos)} {args.photos} photos (first {w}x{h}), 1 thread, per photo the median of {args.repeats}"
    )
    print(f"{'pipeline':<66} {'ms/photo':>9} {'x felzenszwalb':>15}")
    for name in runs:
        print(f"{name:<66} {statistics.median(ms[name]):>9.1f} {statistics.median(ratio[name]):>15.2f}")

    default = DRFI()
    stages: dict[str, float] = {}
    for im in photos:
        for k, v in stage_times(default, im).items():
            stages[k] = stages.get(k, 0.0) + v
    total = sum(stages.values())
    print(
        "default recipe, where the time goes: "
        + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items())
    )

    if hasattr(getattr(cv2, "ximgproc", None), "segmentation"):
        calls = [
            cv2.ximgproc.segmentation.createGraphSegmentation(sigma=s, k=k, min_size=m)
            for s, k, m in MULTI_LEVELS
        ]
        shared = [seconds(lambda im: segment_levels(im, MULTI_LEVELS), im, args.repeats) for im in photos]
        separate = [
            seconds(lambda im: [c.processImage(im) for c in calls], im, args.repeats) for im in photos
        ]
        print(f"segmentation of the 3 levels: shared graph {1e3 * statistics.median(shared):.1f} ms, "
              f"3 cv2.ximgproc calls {1e3 * statistics.median(separate):.1f} ms "
              f"({statistics.median(np.divide(separate, shared)):.1f}x)")  # fmt: skip
    print("target: default <= 1.0x")


if __name__ == "__main__":
    main()
