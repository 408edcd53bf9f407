"""What a whole `maskgen build` costs per method: images/s per core on 2 Ray workers, and the
core-hours that rate implies for ImageNet-1k train (1,281,167 images).

    python benchmarks/build_cost.py [--root DIR] [--images 200] [--repeats 3]

Inputs: real photos (default: ../shared/data/pascal-s-dev/images, PASCAL VOC JPEGs of about
500x375, ImageNet's typical size) as the folder source reads them. Each method builds the same
images with its defaults (drfi: 3 levels, forest with cues, refine; deep: the shipped head on
CPU; center: the pipeline alone), Ray already running (start-up and the workers' first imports
not timed: a warm-up build does those). Prints medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from build_throughput import timed_build

from maskgen.distribute import LOOPBACK_ENV

IMAGENET_TRAIN = 1_281_167
PASCAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pascal-s-dev" / "images"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=PASCAL)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["center", "drfi", "deep"])
    args = ap.parse_args()
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="maskgen-cost-"))
    try:
        files = sorted(p for p in args.root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        (tmp / "images").mkdir()
        (tmp / "warmup").mkdir()
        for f in files[: args.images]:
            os.symlink(f, tmp / "images" / f.name)
        for f in files[-4:]:
            os.symlink(f, tmp / "warmup" / f.name)
        n = len(files[: args.images])
        shard = max(1, n // (4 * args.workers))  # several shards per worker, as in a real build
        ray.init(num_cpus=args.workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level="ERROR")  # fmt: skip
        rates: dict[str, list[float]] = {m: [] for m in args.methods}
        for method in args.methods:
            timed_build(tmp / "warmup", tmp / "out", "ray", args.workers, 1, method)
            for _ in range(args.repeats):
                secs, _ = timed_build(tmp / "images", tmp / "out", "ray", args.workers, shard, method)
                rates[method].append(n / secs)
        ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    from machine import describe, drfi_kernels

    print(f"\n{describe()}\n{drfi_kernels()}")
    print(f"maskgen build on {n} photos of {args.root}, {args.workers} Ray workers, median of {args.repeats}")
    print(f"{'method':<8} {'images/s':>9} {'per core':>9} {'ImageNet-1k train, core-hours':>31}")
    for method, runs in rates.items():
        rate = statistics.median(runs)
        per_core = rate / args.workers
        print(f"{method:<8} {rate:>9.2f} {per_core:>9.2f} {IMAGENET_TRAIN / per_core / 3600:>31.0f}")


if __name__ == "__main__":
    main()
