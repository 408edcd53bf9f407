"""Pipeline overhead of `maskgen build` (center method): images/s in-process, with 1 and 2 Ray workers.

Inputs are ImageNet-sized JPEGs (500x375, quality 90, textured synthetic scenes) written to
a temporary folder. The center method costs almost nothing, so this measures the pipeline
itself: read, decode, post-process, PNG-encode the mask, write the tar, stats.

    python benchmarks/build_throughput.py [--images 600] [--repeats 3]

Prints a table of medians and the per-stage split of worker time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
from PIL import Image

from maskgen.distribute import LOOPBACK_ENV, run_jobs
from maskgen.pipeline import BuildOptions, make_plan
from maskgen.sources.synthetic import render_scene


def make_inputs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        rgb, _, _ = render_scene(7, i)
        rgb = cv2.resize(rgb, (500, 375), interpolation=cv2.INTER_CUBIC)
        Image.fromarray(rgb).save(folder / f"{i:06d}.jpg", quality=90)


def timed_build(
    root: Path, out: Path, executor: str, workers: int, shard_size: int, method: str = "center"
) -> tuple[float, dict]:
    """Seconds to build every shard (Ray already running: its start-up is not counted)."""
    shutil.rmtree(out, ignore_errors=True)
    (out / "shards").mkdir(parents=True)
    opts = BuildOptions(source="folder", source_config={"root": str(root)}, method=method, out=str(out),
                        shard_size=shard_size, workers=workers, executor=executor)  # fmt: skip
    plan = make_plan(opts)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    for outcome in run_jobs(plan.spec, plan.jobs, workers, None, executor):
        assert outcome.error is None, outcome.error
        for k, v in outcome.stats["seconds"].items():
            stages[k] = stages.get(k, 0.0) + v
    return time.perf_counter() - t0, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=50)
    args = ap.parse_args()

    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="maskgen-bench-"))
    try:
        make_inputs(tmp / "images", args.images)
        make_inputs(tmp / "warmup", 8)
        results: dict[str, list[float]] = {"in-process": [], "ray x1": [], "ray x2": []}
        stages: dict[str, float] = {}
        for _ in range(args.repeats):
            for name, executor, workers in (
                ("in-process", "local", 1),
                ("ray x1", "ray", 1),
                ("ray x2", "ray", 2),
            ):
                if executor == "ray":  # a fresh instance with `workers` CPUs; start-up not timed
                    ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                             log_to_driver=False, logging_level="ERROR")  # fmt: skip
                    # warm-up: start the worker processes and import maskgen in them, as the
                    # first shards of a long build do
                    timed_build(tmp / "warmup", tmp / "out", executor, workers, 4)
                secs, st = timed_build(tmp / "images", tmp / "out", executor, workers, args.shard_size)
                if executor == "ray":
                    ray.shutdown()
                results[name].append(args.images / secs)
                if name == "in-process":
                    for k, v in st.items():
                        stages[k] = stages.get(k, 0.0) + v
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nmaskgen build, center method, {args.images} JPEGs 500x375, shards of {args.shard_size}, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'setting':<12} {'images/s':>10} {'runs':>30}")
    for k, v in med.items():
        print(f"{k:<12} {v:>10.1f} {' '.join(f'{x:.1f}' for x in results[k]):>30}")
    print(f"ray x2 / ray x1 = {med['ray x2'] / med['ray x1']:.2f}   (target >= 1.8)")
    print(f"per-core pipeline rate (ray x1) = {med['ray x1']:.0f} images/s   (target >= 150)")
    total = sum(stages.values())
    print("worker time by stage (in-process runs): " + ", ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))  # fmt: skip


if __name__ == "__main__":
    main()
