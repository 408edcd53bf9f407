"""HARL vs BYOL training-step time at equal backbone, batch and image size.

    python benchmarks/train_step.py [--arch resnet18] [--batch 32] [--size 112] [--steps 10]
                                     [--repeats 3] [--device cpu|cuda] [--amp bf16]

A step is forward (both views, online and target), backward, LARS step and EMA update, on a
fixed synthetic batch (data loading excluded: see loader_throughput.py). Target (issue 5):
HARL <= 1.05x BYOL. On a GPU, --arch resnet50 --batch 256 --size 224 --amp bf16
--channels-last gives the images/s of the headline recipe.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sslmask.config import load_config
from sslmask.methods import build_method
from sslmask.optim import build_optimizer


def step_times(method_name: str, args) -> list[float]:
    cfg = load_config(method_name, None, [f"model.arch={args.arch}"])
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    method = build_method(cfg).to(args.device, memory_format=fmt)
    opt = build_optimizer("lars", method.param_groups(1e-6), 0.1)
    g = torch.Generator().manual_seed(0)
    batch = {}
    for v in range(2):
        batch[f"view{v}"] = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(
            args.device, memory_format=fmt
        )
        mask = torch.zeros(args.batch, 1, args.size, args.size)
        mask[:, :, args.size // 4 : 3 * args.size // 4, args.size // 5 : 4 * args.size // 5] = 1
        batch[f"mask{v}"] = mask.to(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    times = []
    for i in range(args.steps + 2):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
            loss = method(batch, i, 100)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step(i, 100)
        opt.step()
        method.after_optimizer_step(i, 100)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    med: dict[str, list[float]] = {"byol": [], "harl": []}
    for _ in range(args.repeats):  # interleaved runs
        for name in med:
            med[name].append(statistics.median(step_times(name, args)))
    byol, harl = statistics.median(med["byol"]), statistics.median(med["harl"])
    print(
        f"{args.arch}, batch {args.batch}, {args.size}px, {args.device}, amp {args.amp}; median of {args.repeats}"
    )
    print(f"{'method':<8}{'ms/step':>10}{'images/s':>10}")
    for name, t in (("byol", byol), ("harl", harl)):
        print(f"{name:<8}{1000 * t:>10.1f}{args.batch / t:>10.1f}")
    print(f"harl / byol step time: {harl / byol:.3f}")


if __name__ == "__main__":
    main()
