"""k-NN and linear accuracy against training budget, next to a random-initialised backbone.

    python benchmarks/learning_curve.py --train runs/imagenette-drfi \\
        --val ../shared/data/imagenette-224/val --config imagenette-cpu \\
        --methods byol harl --epochs-at 5 10 20 40 [--seed 0] [--out runs/curve]

Each method trains once for max(--epochs-at) epochs and keeps its backbone after each listed
epoch (``train.snapshot_epochs``), so the points lie on one learning-rate schedule, the way
papers plot k-NN during training; the random-init row is epoch 0. Every point is evaluated
with ``sslmask eval``'s k-NN (k = 20, T = 0.07) and linear probe: the training shards are the
labelled bank / probe training set, --val the held-out set. Results go to OUT/curve.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ssl_compare import SHARED, evaluate

from sslmask.config import load_settings
from sslmask.engine import snapshot_path, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--train", nargs="+", required=True, help="training shards (labelled); also the k-NN bank"
    )
    ap.add_argument("--val", nargs="+", required=True)
    ap.add_argument("--config", default="imagenette-cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--methods", nargs="+", default=["byol", "harl"])
    ap.add_argument("--epochs-at", nargs="+", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=None, help="evaluation size (default: data.image_size)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="learning_curve_"))
    epochs = sorted(set(args.epochs_at))
    points: list[dict] = []
    for method in args.methods:
        mine = [o for o in args.overrides if o.split(".")[0] in SHARED or o.split(".")[0] == method]
        sets = [
            *mine,
            f"train.seed={args.seed}",
            f"train.epochs={epochs[-1]}",
            f"train.snapshot_epochs={epochs}",
        ]
        cfg = load_settings(method, args.config, sets)
        size = args.image_size or cfg.data.image_size
        if not points:
            points.append(point("random", 0, "random", cfg.model.arch, args, size))
        run = out / f"{method}-seed{args.seed}"
        t0 = time.perf_counter()
        train(args.train, cfg, run, resume=True)
        print(f"{method}: trained in {(time.perf_counter() - t0) / 60:.1f} min (this invocation)", flush=True)
        for epoch in epochs:
            snap = str(snapshot_path(run, epoch))
            points.append(point(method, epoch, snap, cfg.model.arch, args, size))
    (out / "curve.json").write_text(json.dumps(points, indent=2))
    print(f"\n{'backbone':<10}{'epochs':>7}{'k-NN k=20':>11}{'linear':>9}   (top-1 %, {args.val[0]})")
    for p in points:
        print(f"{p['method']:<10}{p['epochs']:>7}{p['knn20']:>11.1f}{p['linear']:>9.1f}")


def point(method: str, epochs: int, checkpoint: str, arch: str, args, size: int) -> dict:
    result = {"method": method, "epochs": epochs}
    result.update(evaluate(checkpoint, arch, args.train, args.val, size, args.seed))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
