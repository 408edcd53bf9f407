"""DRFI speed: ms/image of the whole drfi pipeline next to one skimage felzenszwalb call.

    python benchmarks/drfi_speed.py [--images 30] [--repeats 3]

Inputs: ECSSD photos from ../shared/data resized to ImageNet's typical 500x375 (or the
scikit-image photos when the folder is absent). One thread (as a build worker runs). Prints
medians over repeats and where the time goes at the HARL default.
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

from maskgen.methods.drfi.features import pixel_features, region_features
from maskgen.methods.drfi.method import DRFI
from maskgen.methods.drfi.segment import segment

ECSSD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ecssd-dev" / "images"


def load_images(n: int) -> list[np.ndarray]:
    if ECSSD.is_dir():
        files = sorted(ECSSD.iterdir())[:n]
    else:
        import skimage.data

        files = sorted(Path(skimage.data.__file__).parent.glob("*.png"))[:n]
    out = []
    for f in files:
        im = np.asarray(Image.open(f).convert("RGB"))
        size = (500, 375) if im.shape[1] >= im.shape[0] else (375, 500)
        out.append(cv2.resize(im, size, interpolation=cv2.INTER_AREA))
    return out


def per_image_ms(fn, images) -> float:
    t = time.perf_counter()
    for im in images:
        fn(im)
    return (time.perf_counter() - t) / len(images) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    images = load_images(args.images)
    runs = {
        "skimage felzenszwalb (1 call, HARL setting)": lambda im: felzenszwalb(
            im, scale=300, sigma=0.8, min_size=1000
        ),
        "drfi harl, heuristic scorer": DRFI(scorer="heuristic", levels="harl", refine=0).saliency,
        "drfi harl, unsupervised forest": DRFI(model="unsupervised", levels="harl", refine=0).saliency,
        "drfi default (3 levels, forest with cues, refine)": DRFI().saliency,
        "drfi 3 levels, forest without cues, refine": DRFI(model="unsupervised").saliency,
        "drfi 3 levels, unsupervised + heuristic, refine": DRFI(
            scorer="forest+heuristic", model="unsupervised"
        ).saliency,
        "drfi 3 levels, rbd": DRFI(scorer="rbd", refine=0).saliency,
        "drfi drfi15 (15 levels), forest with cues, refine": DRFI(levels="drfi15").saliency,
    }
    results: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            results[name].append(per_image_ms(fn, images))
    med = {k: statistics.median(v) for k, v in results.items()}
    ref = med["skimage felzenszwalb (1 call, HARL setting)"]

    stages = {"pixel features": 0.0, "segmentation": 0.0, "region features + score": 0.0}
    forest = DRFI(model="unsupervised", levels="harl", refine=0).scorers[0]
    for im in images:
        t0 = time.perf_counter()
        pix = pixel_features(im)
        t1 = time.perf_counter()
        labels = segment(im, 0.8, 300, 1000)
        t2 = time.perf_counter()
        feats, stats = region_features(pix, labels)
        forest.score(feats, stats)
        t3 = time.perf_counter()
        stages["pixel features"] += t1 - t0
        stages["segmentation"] += t2 - t1
        stages["region features + score"] += t3 - t2

    h, w = images[0].shape[:2]
    print(f"\n{len(images)} photos at about {w}x{h}, 1 thread, median of {args.repeats}")
    print(f"{'pipeline':<52} {'ms/image':>9} {'x felzenszwalb':>15}")
    for k, v in med.items():
        print(f"{k:<52} {v:>9.1f} {v / ref:>15.2f}")
    total = sum(stages.values())
    print("drfi harl time: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items()))
    print("targets: harl <= 1.0x, default <= 2.5x, multi-level <= 5x")


if __name__ == "__main__":
    main()
