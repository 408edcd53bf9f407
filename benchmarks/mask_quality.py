"""Mask quality, cross-dataset: every mask method and variant measured on a saliency set that
was used neither to fit it nor to choose its constants.

    python benchmarks/mask_quality.py [--data ../shared/data] [--out /tmp/mask-quality]
                                      [--only NAME ...] [--head NAME=FILE ...] [--limit N]

Two labelled sets, ECSSD (``ecssd-dev``, 500 images) and PASCAL-S (``pascal-s-dev``, 425). A
variant that is fitted on ground truth is fitted on one and measured on the other, in both
directions (``maskgen drfi fit --gt``, then ``maskgen build --gt``). Every row names where its
model was fitted, where its constants were chosen, and where it was measured. DRFI's
refinement constants (``refine=1``) were chosen on ECSSD 0401-0480, so a row with refinement
measured on ECSSD is marked: only its PASCAL-S figure is clean.

``--head NAME=FILE`` adds a ``--method deep --param refine=1`` row for a head from
``maskgen deep fit`` (say where it was taught in NAME). Fitted models and builds are kept in
``--out`` and reused, so an interrupted run resumes. Prints one markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETS = {"ECSSD": "ecssd-dev", "PASCAL-S": "pascal-s-dev"}
REFINE_TUNED = "ECSSD 0401-0480 (refine)"
PAPERS = "papers' constants"


@dataclass
class Variant:
    name: str
    method: str
    params: list[str]
    fitted: str = "nothing"  # where its model was fitted ("other": the other set, with its GT)
    tuned: str = "nothing"
    fit_args: list[str] = field(default_factory=list)  # maskgen drfi fit options, when fitted on "other"
    build_args: list[str] = field(default_factory=list)  # more maskgen build options


VARIANTS = [
    Variant("center prior", "center", []),
    Variant("drfi model=unsupervised + heuristic, 3 levels, refine (label-free)", "drfi",
            ["model=unsupervised", "scorer=forest+heuristic", "levels=multi", "refine=1"],
            fitted="synthetic sample scenes (pseudo labels)", tuned=REFINE_TUNED),
    Variant("rbd (boundary connectivity), 3 levels", "drfi", ["scorer=rbd", "levels=multi", "refine=0"],
            tuned=PAPERS),
    Variant("mr (manifold ranking), 3 levels, refine", "drfi", ["scorer=mr", "levels=multi", "refine=1"],
            tuned=f"{PAPERS}; {REFINE_TUNED}"),
    Variant("drfi GT forest (93-d), 3 levels, refine", "drfi", ["levels=multi", "refine=1"], fitted="other",
            tuned=REFINE_TUNED, fit_args=["--features", "drfi"]),
    Variant("drfi GT forest (93-d + cues), 3 levels, refine: the default recipe", "drfi",
            ["levels=multi", "refine=1"], fitted="other", tuned=REFINE_TUNED,
            fit_args=["--features", "drfi+cues"]),
]  # fmt: skip


def run(args: list[str], log: Path) -> None:
    with log.open("w") as f:
        if subprocess.run(args, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            sys.exit(f"mask_quality: {' '.join(args[:3])} failed, see {log}")


def fitted_model(v: Variant, fit_on: str, data: Path, out: Path) -> Path:
    """The GT forest of ``v`` fitted on ``fit_on`` (cached)."""
    model = out / "models" / f"{fit_on}-{'-'.join(a.strip('-') for a in v.fit_args)}.npz"
    if not model.exists():
        model.parent.mkdir(parents=True, exist_ok=True)
        root = data / SETS[fit_on]
        run([str(BIN / "maskgen"), "drfi", "fit", "--source", "folder", "--root", str(root / "images"),
             "--gt", str(root / "masks"), "--levels", "multi", *v.fit_args, "--jobs", "2",
             "--out", str(model)], model.with_suffix(".log"))  # fmt: skip
    return model


def measured(v: Variant, params: list[str], on: str, data: Path, out: Path, limit: int | None) -> dict:
    """report.json of a build of ``on`` (cached: a finished build with the same args is reused)."""
    root = data / SETS[on]
    args = ["build", "--source", "folder", "--root", str(root / "images"), "--gt", str(root / "masks"),
            "--method", v.method, *v.build_args, "--shard-size", "100", "--no-progress"]  # fmt: skip
    for p in params:
        args += ["--param", p]
    if limit:
        args += ["--limit", str(limit)]
    build = out / "builds" / f"{on}-{hashlib.sha1(json.dumps(args).encode()).hexdigest()[:12]}"
    report = build / "report.json"
    stamp = build.parent / f"{build.name}.args.json"
    if not (report.exists() and stamp.exists() and json.loads(stamp.read_text()) == args):
        build.parent.mkdir(parents=True, exist_ok=True)
        run([str(BIN / "maskgen"), *args, "--out", str(build), "--overwrite"], build.with_suffix(".log"))
        stamp.write_text(json.dumps(args))
    return json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(HERE.parent / "shared" / "data"))
    ap.add_argument("--out", default="/tmp/mask-quality")
    ap.add_argument("--only", nargs="*", help="Run only the variants whose name contains one of these.")
    ap.add_argument("--head", action="append", default=[], metavar="NAME=FILE", help="A deep head to add.")
    ap.add_argument("--limit", type=int, help="First N images of each set (a quick check).")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    missing = [d for d in SETS.values() if not (data / d / "images").is_dir()]
    if missing:
        sys.exit(f"mask_quality: {data} lacks {', '.join(missing)}")
    variants = [v for v in VARIANTS if not args.only or any(o in v.name for o in args.only)]
    for spec in args.head:
        name, _, path = spec.partition("=")
        variants.append(Variant(f"deep student ({name}), refine", "deep", ["refine=1"], fitted=name,
                                tuned=REFINE_TUNED, build_args=["--head", str(Path(path).resolve())]))  # fmt: skip

    print("| variant | fitted on | constants chosen on | measured on | mIoU | MAE | max F | S |")
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        for on in SETS:
            params, fitted = list(v.params), v.fitted
            if v.fitted == "other":
                fit_on = next(s for s in SETS if s != on)
                params.append(f"model={fitted_model(v, fit_on, data, out)}")
                fitted = f"{fit_on} (its GT)"
            r = measured(v, params, on, data, out, args.limit)
            clean = "" if REFINE_TUNED not in v.tuned or on != "ECSSD" else " (not clean: refine tuned here)"
            cells = " | ".join(f"{r[k]:.3f}" for k in ("miou", "mae", "max_fbeta", "s_measure"))
            print(f"| {v.name} | {fitted} | {v.tuned} | {on}{clean} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
