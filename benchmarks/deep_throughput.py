"""--method deep throughput: end to end (JPEG bytes in, mask PNG in a tar out) vs model only.

    python benchmarks/deep_throughput.py [--arch resnet18] [--short-side 224] [--images 96]
                                         [--repeats 3] [--batch 16] [--decode auto|pil|device]

Makes a head file with a randomly initialised backbone (speed does not depend on the
weights), builds the sample source with it in-process (`--executor local`, one worker), and
times the network alone on the same number of images at the same size, batched. Issue 4's
GPU target is >= 2,000 images/s end to end with ResNet-50 at 224 on one H100-class GPU and
end-to-end >= 0.7x model-only; on CPU only the ratio is meaningful. ``--decode device``
decodes the JPEGs with torchvision in the method (nvJPEG on a GPU) instead of PIL in the
worker; ``auto`` is that on a GPU and PIL on CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from maskgen.cli import main as maskgen
from maskgen.methods.deep.model import SaliencyNet, save_head
from sslmask.backbones import build_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--short-side", type=int, default=224)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", choices=("auto", "pil", "device"), default="auto")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="deep_bench_"))
    torch.manual_seed(0)
    net = SaliencyNet(build_backbone(args.arch))
    head = tmp / "head.safetensors"
    save_head(net, head, {"arch": args.arch, "out_stride": 32, "short_side": args.short_side})
    net = net.to(device).eval()
    if device == "cpu":
        torch.set_num_threads(1)  # the build worker runs one thread too

    end_to_end, model_only = [], []
    for r in range(args.repeats):
        out = tmp / f"build{r}"
        t0 = time.perf_counter()
        rc = maskgen(["build", "--source", "sample", "--sample-size", str(args.images), "--no-photos", "--method",
                      "deep", "--head", str(head), "--out", str(out), "--executor", "local", "--no-progress",
                      "--shard-size", "1000", "--param", f"decode={args.decode}"])  # fmt: skip
        assert rc == 0
        wall = time.perf_counter() - t0
        report = json.loads((out / "report.json").read_text())
        end_to_end.append(report["images_per_second"] or args.images / wall)
        # the sample scenes are 160-320 px: time the network on the short side it resizes them to
        x = torch.randn(args.batch, 3, args.short_side, args.short_side * 5 // 4, device=device)
        with torch.no_grad():
            net(x)  # warm-up
            t0 = time.perf_counter()
            n = 0
            while n < args.images:
                torch.sigmoid(net(x))
                n += args.batch
            if device == "cuda":
                torch.cuda.synchronize()
        model_only.append(n / (time.perf_counter() - t0))
        shutil.rmtree(out)
    e2e, model = statistics.median(end_to_end), statistics.median(model_only)
    print(
        f"{args.arch}, short side {args.short_side}, {args.images} images, {device}, "
        f"decode={args.decode}, median of {args.repeats}"
    )
    print(f"{'pipeline':<44}{'images/s':>10}")
    print(f"{'end to end (JPEG -> mask PNG in tar, 1 worker)':<44}{e2e:>10.1f}")
    print(f"{'model only (batched forward + sigmoid)':<44}{model:>10.1f}")
    print(f"{'ratio end to end / model only':<44}{e2e / model:>10.2f}")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
