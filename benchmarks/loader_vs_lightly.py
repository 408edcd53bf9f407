"""sslmask's training loader against lightly's, side by side on the same photos (issue 14).

    pip install -e ".[bench]"      # lightly, for this benchmark only
    python benchmarks/loader_vs_lightly.py ../shared/data/imagenette-224/train [--size 96] \\
        [--views byol|dino] [--batch 64] [--batches 20] [--workers 2] [--pairs 3]

Both read a class-folder tree and give each image's views through a DataLoader with
--workers worker processes: sslmask's ``ViewsDataset`` (no masks: what BYOL, DINO or MoCo
read) and lightly's transform over torchvision's ``ImageFolder``. ``byol``: BYOL's two views
at --size px (lightly's ``BYOLTransform``); ``dino``: multi-crop, 2 global views at --size
px and 6 local ones at half of it (lightly's ``DINOTransform``, the same scales). Each pair runs both, interleaved (so a change of load hits both alike), for
--batches batches after one warm-up batch; the figure is images/s (an image = its two views),
median over pairs, and the ratio sslmask / lightly. Target: >= 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader

from maskio.records import index_folder
from sslmask.dataset import EpochBatchSampler, ViewsDataset
from sslmask.transforms import byol_views, multi_crop_views


def images_per_second(loader, batches: int) -> float:
    """Images per second over ``batches`` batches, after one warm-up batch (worker start-up)."""
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(it)
        n += len(batch["index"]) if isinstance(batch, dict) else len(batch[1])
    return n / (time.perf_counter() - t0)


GLOBAL_SCALE, LOCAL_SCALE, N_LOCAL = (0.4, 1.0), (0.05, 0.4), 6  # lightly's DINOTransform defaults


def sslmask_loader(root: str, args, epoch: int) -> DataLoader:
    records = index_folder(root)
    size, batch, batches = args.size, args.batch, args.batches
    views = (byol_views(size) if args.views == "byol"
             else multi_crop_views(size, GLOBAL_SCALE, N_LOCAL, size // 2, LOCAL_SCALE))  # fmt: skip
    dataset = ViewsDataset(records, views, seed=0, masks=False)
    sampler = EpochBatchSampler(len(dataset), batch, epoch, seed=0, samples_per_epoch=batch * (batches + 1))
    return DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers)


def lightly_loader(root: str, args, epoch: int) -> DataLoader:
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, DINOTransform
    from torchvision.datasets import ImageFolder

    size = args.size
    if args.views == "byol":
        transform = BYOLTransform(BYOLView1Transform(input_size=size), BYOLView2Transform(input_size=size))
    else:
        transform = DINOTransform(global_crop_size=size, global_crop_scale=GLOBAL_SCALE, local_crop_size=size // 2,
                                  local_crop_scale=LOCAL_SCALE, n_local_views=N_LOCAL)  # fmt: skip
    g = torch.Generator().manual_seed(epoch)
    return DataLoader(ImageFolder(root, transform=transform), batch_size=args.batch, shuffle=True, generator=g,
                      num_workers=args.workers, drop_last=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a class-folder tree of photos")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--views", choices=("byol", "dino"), default="byol")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    ours, theirs = [], []
    for pair in range(args.pairs):
        ours.append(images_per_second(sslmask_loader(args.root, args, pair), args.batches))
        theirs.append(images_per_second(lightly_loader(args.root, args, pair), args.batches))
        print(f"pair {pair}: sslmask {ours[-1]:.1f}, lightly {theirs[-1]:.1f} images/s", flush=True)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"{args.views} views at {args.size} px, batch {args.batch}, {args.workers} workers, "
          f"median of {args.pairs} pairs")  # fmt: skip
    print(f"sslmask {o:.1f} images/s, lightly {t:.1f} images/s, ratio {o / t:.2f} (target >= 1.0)")


if __name__ == "__main__":
    main()
