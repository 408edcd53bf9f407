"""How good must masks be? A mask-aware method trained on builds of one photo set whose masks
differ only in quality, against its mask-free twin, at one budget and several seeds.

    # train and score every arm, seed by seed (resumable: finished runs are skipped)
    python benchmarks/mask_dose.py run --out runs/dose --method harl \\
        --arm exact=B/gt1 --arm 0.9=B/gt0.9 ... --arm centre=B/center --twin byol=B/gt1:byol \\
        --bank B/gt1 --val caltech101-seg/val --config moco-cpu --image-size 64 \\
        --set model.pred_hidden=512 --seeds 0 1 2
    # the table (gain over the twin, mean +- standard error of the paired per-seed differences)
    # and the plot (needs the bench extra: matplotlib)
    python benchmarks/mask_dose.py report --out runs/dose --png docs/mask_dose.png

An arm is ``LABEL=BUILD[:METHOD][:KEY=VALUE...]``: the build whose masks it trains on (its
report.json gives the masks' mIoU against the photos' ground truth, the x axis), the method
(default ``--method``) and extra config sets. The twin is an arm too; it differs from the
others only in the method (same crops: ``data.min_fg`` is shared unless an arm sets it, same
seeds, same data order, same budget). Every run is scored on ``--val`` with ``--bank`` as the
k-NN memory bank and probe training set (``ssl_compare.evaluate``: k-NN k = 20, linear probe,
retrieval), and the random-initialised backbone once per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ssl_compare import evaluate, variant_config

from sslmask.engine import train

RESULTS = "results.jsonl"
METRICS = ("knn20", "linear")


def parse_arm(spec: str, method: str) -> tuple[str, str, str, list[str]]:
    """``"0.7=/b/gt0.7:harl:data.min_fg=0.2"`` -> ``("0.7", "/b/gt0.7", "harl", ["data.min_fg=0.2"])``."""
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise SystemExit(f"--arm {spec}: expected LABEL=BUILD[:METHOD][:KEY=VALUE...]")
    build, *parts = rest.split(":")
    if parts and "=" not in parts[0]:
        method, parts = parts[0], parts[1:]
    return label, build, method, parts


def done_runs(out: Path) -> set[tuple[str, int]]:
    path = out / RESULTS
    if not path.is_file():
        return set()
    return {(r["arm"], r["seed"]) for r in map(json.loads, path.read_text().splitlines())}


def record(out: Path, row: dict) -> None:
    with (out / RESULTS).open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = [parse_arm(a, args.method) for a in [*args.twin, *args.arm]]
    for seed in args.seeds:  # seed-major: a stopped run still has whole seeds
        arch = None
        for label, build, method, sets in arms:
            cfg_label, cfg = variant_config(":".join([method, *sets]), args.config, args.overrides, seed)
            arch = cfg.model.arch
            if (label, seed) in done_runs(out):
                continue
            folder = out / f"{label}-seed{seed}"
            t0 = time.perf_counter()
            train([build], cfg, folder, resume=True)
            minutes = (time.perf_counter() - t0) / 60
            scores = evaluate(str(folder), arch, args.bank, args.val, args.image_size, seed)
            record(out, {"arm": label, "seed": seed, "build": build, "method": method, "sets": sets,
                         "mask_miou": mask_miou(build), **scores, "train_min": round(minutes, 1)})  # fmt: skip
        if ("random", seed) not in done_runs(out) and arch is not None:
            scores = evaluate("random", arch, args.bank, args.val, args.image_size, seed)
            record(out, {"arm": "random", "seed": seed, "build": None, "method": None, "mask_miou": None,
                         **scores})  # fmt: skip


def mask_miou(build: str) -> float | None:
    report = Path(build) / "report.json"
    return json.loads(report.read_text()).get("miou") if report.is_file() else None


def paired_gain(rows: list[dict], twin: list[dict], metric: str) -> tuple[float, float, int]:
    """Mean and standard error of (arm - twin) over the seeds both have."""
    by_seed = {r["seed"]: r[metric] for r in twin}
    diffs = [r[metric] - by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]
    if not diffs:
        return float("nan"), float("nan"), 0
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se, len(diffs)


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in (Path(args.out) / RESULTS).read_text().splitlines()]
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    twin = arms.get(args.twin_label, [])
    print(f"| arm | masks' mIoU | seeds | k-NN [per seed] | linear [per seed] | k-NN gain over {args.twin_label} "
          f"| linear gain over {args.twin_label} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    points = []
    for label, results in arms.items():
        results.sort(key=lambda r: r["seed"])
        miou = results[0].get("mask_miou")
        cells = []
        for metric in METRICS:
            values = [r[metric] for r in results]
            cells.append(f"{statistics.median(values):.1f} [{', '.join(f'{v:.1f}' for v in values)}]")
        gains = []
        for metric in METRICS:
            mean, se, n = paired_gain(results, twin, metric)
            spread = f" ± {se:.1f}" if n > 1 else " (1 seed)"
            gains.append("" if label in (args.twin_label, "random") or not n else f"{mean:+.1f}{spread}")
            if label not in (args.twin_label, "random") and n and miou is not None:
                points.append((label, miou, metric, mean, se))
        miou_text = "—" if miou is None or label == args.twin_label else f"{miou:.3f}"  # the twin reads none
        print(f"| {label} | {miou_text} | {len(results)} | {' | '.join(cells)} | {' | '.join(gains)} |")
    if args.png:
        plot(points, args.png, args.twin_label, args.title)


def plot(points: list[tuple], png: str, twin: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, name in zip(axes, METRICS, ("k-NN (k = 20)", "linear probe"), strict=True):
        mine = sorted((p for p in points if p[2] == metric), key=lambda p: p[1])
        ax.axhline(0, color="grey", lw=1)
        ax.errorbar([p[1] for p in mine], [p[3] for p in mine], yerr=[p[4] for p in mine], fmt="o", capsize=3)
        for label, x, _, y, _ in mine:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("masks' mIoU against the exact outlines")
        ax.set_title(name)
    axes[0].set_ylabel(f"top-1 gain over {twin} (points, mean ± s.e. over seeds)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}", file=sys.stderr)  # stdout is the table alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--method", default="harl")
    r.add_argument("--arm", action="append", default=[], help="LABEL=BUILD[:METHOD][:KEY=VALUE...]")
    r.add_argument("--twin", action="append", default=[], help="the mask-free twin, as an arm")
    r.add_argument("--bank", nargs="+", required=True)
    r.add_argument("--val", nargs="+", required=True)
    r.add_argument("--config", default="moco-cpu")
    r.add_argument("--set", dest="overrides", action="append", default=[])
    r.add_argument("--image-size", type=int, default=64)
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    p.add_argument("--twin-label", default="byol")
    p.add_argument("--png")
    p.add_argument("--title", default="Mask-aware training vs its mask-free twin")
    args = ap.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
