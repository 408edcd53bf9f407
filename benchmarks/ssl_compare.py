"""Every method vs a random-initialised backbone at equal budget: k-NN and linear accuracy.

    python benchmarks/ssl_compare.py --train out/demo --val out/demo-val --seeds 0 1 2 \\
        [--config cpu-demo] [--set train.epochs=20 ...] [--image-size 96] [--out runs/compare]

Trains each method once per seed with the same config (only `method` differs; a --set for
another method's own section, e.g. dino.out_dim, applies to that method only), evaluates the
online backbone with `sslmask eval`'s k-NN (k = 20, T = 0.07) and linear probe on the held-out
set, and prints per-seed numbers and medians. --val may be a class-folder tree (Imagenette).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from sslmask.config import load_config
from sslmask.engine import train
from sslmask.eval.features import labelled_features
from sslmask.eval.knn import knn_eval
from sslmask.eval.linear import linear_probe

SHARED = ("data", "model", "optim", "ema", "train", "monitor")  # sections every method has


def evaluate(checkpoint: str, arch: str, train_spec, val_spec, size: int, seed: int) -> dict[str, float]:
    ftr, ytr, fva, yva = labelled_features(checkpoint, arch, train_spec, val_spec, size, seed=seed)
    knn = knn_eval(ftr, ytr, fva, yva, ks=(20,))["k=20"]["top1"]
    lin = linear_probe(ftr, ytr, fva, yva)["top1"]
    return {"knn20": knn, "linear": lin}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", nargs="+", required=True, help="training shards (masks); also the k-NN bank")
    ap.add_argument("--bank", nargs="+", help="labelled memory bank / probe training set (default: --train)")
    ap.add_argument("--val", nargs="+", required=True)
    ap.add_argument("--config", default="cpu-demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--methods", nargs="+", default=["byol", "harl", "dino", "mocov2", "mocov3"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ssl_compare_"))
    bank = args.bank or args.train
    rows: dict[str, list[dict[str, float]]] = {"random": [], **{m: [] for m in args.methods}}
    for seed in args.seeds:
        arch = None
        for method in args.methods:
            mine = [o for o in args.overrides if o.split(".")[0] in SHARED or o.split(".")[0] == method]
            cfg = load_config(method, args.config, [*mine, f"train.seed={seed}"])
            arch = cfg["model"]["arch"]
            run = out / f"{method}-seed{seed}"
            train(args.train, cfg, run, resume=True)
            rows[method].append(evaluate(str(run), arch, bank, args.val, args.image_size, seed))
            print(json.dumps({"method": method, "seed": seed, **rows[method][-1]}), flush=True)
        rows["random"].append(evaluate("random", arch, bank, args.val, args.image_size, seed))
        print(json.dumps({"method": "random", "seed": seed, **rows["random"][-1]}), flush=True)
    print(f"\nmedian over seeds {args.seeds} (top-1 %, held-out set)")
    print(f"{'backbone':<10}{'k-NN k=20':>12}{'linear':>10}")
    for name, results in rows.items():
        knn = statistics.median(r["knn20"] for r in results)
        lin = statistics.median(r["linear"] for r in results)
        print(f"{name:<10}{knn:>12.1f}{lin:>10.1f}")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
