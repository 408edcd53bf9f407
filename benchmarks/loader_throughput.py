"""Joint image+mask loading vs image-only loading, same shards, same augmentations.

    python benchmarks/loader_throughput.py [BUILD_DIR] [--size 224] [--batches 20] [--repeats 3]

Without BUILD_DIR it builds the sample source (center masks) into a temporary folder. The
loader runs in this process (DataLoader workers=0), so the numbers are per core; target:
joint >= 0.8x image-only images/s (issue 5).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

from torch.utils.data import DataLoader

from maskio.records import index_shards
from sslmask.dataset import EpochBatchSampler, ViewsDataset
from sslmask.transforms import byol_views


def images_per_s(dataset: ViewsDataset, batch: int, batches: int, epoch: int) -> float:
    sampler = EpochBatchSampler(len(dataset), batch, epoch, seed=0, samples_per_epoch=batch * batches)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    t0 = time.perf_counter()
    n = sum(len(b["index"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("build", nargs="?")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    build = args.build
    if build is None:
        from maskgen.cli import main as maskgen

        build = tempfile.mkdtemp() + "/sample"
        maskgen(["build", "--source", "sample", "--method", "center", "--out", build, "--executor", "local",
                 "--no-progress"])  # fmt: skip
    records = index_shards([build], require_masks=True)
    image_only = dataclasses.replace(records, mask=None)
    views = byol_views(args.size, min_fg=0.2)
    joint_ds, plain_ds = ViewsDataset(records, views, 0), ViewsDataset(image_only, views, 0)
    joint, plain = [], []
    for r in range(args.repeats):  # interleaved, so drift affects both alike
        plain.append(images_per_s(plain_ds, args.batch, args.batches, r))
        joint.append(images_per_s(joint_ds, args.batch, args.batches, r))
    pj, jj = statistics.median(plain), statistics.median(joint)
    print(
        f"{len(records)} samples, two {args.size}px views each, batch {args.batch}, {args.repeats} runs (median)"
    )
    print(f"{'pipeline':<28}{'images/s':>10}")
    print(f"{'image only':<28}{pj:>10.1f}")
    print(f"{'image + mask (re-crop 0.2)':<28}{jj:>10.1f}")
    print(f"{'ratio joint / image-only':<28}{jj / pj:>10.2f}")


if __name__ == "__main__":
    main()
