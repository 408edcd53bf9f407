"""Mask quality of center vs the DRFI variants, on ECSSD (../shared/data/ecssd-dev) and the sample source.

    python benchmarks/drfi_quality.py [--ecssd ../shared/data/ecssd-dev] [--out /tmp/drfi-quality]

Rows on ECSSD are evaluated on images 0001-0100 (the "test" part). Unsupervised rows use no
ground truth anywhere; "pseudo_rf (fit on ECSSD 101-500, no GT)" fits the forest on the other
400 images' pseudo labels ("masks round": one self-training round labelled by the method's own
refined masks, ``--round-labels masks``); "forest fit with GT on ECSSD 101-500" is the
supervised reference. The default forest shipped with maskgen was fitted on the sample source
only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from maskgen.cli import main as maskgen

METRICS = ("miou", "mae", "max_fbeta", "s_measure", "e_measure", "images_per_second")


def split(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        if not (dst / n).exists():
            os.symlink((src / n).resolve(), dst / n)
    return dst


def build(out: Path, method: str, params: list[str], source: list[str]) -> dict:
    args = [
        "build",
        *source,
        "--method",
        method,
        "--out",
        str(out),
        "--overwrite",
        "--no-progress",
        "--shard-size",
        "50",
    ]
    for p in params:
        args += ["--param", p]
    assert maskgen(args) == 0
    return json.loads((out / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--ecssd", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/ecssd-dev")
    )
    ap.add_argument("--out", default="/tmp/drfi-quality")
    ap.add_argument("--sample-size", type=int, default=200)
    args = ap.parse_args()
    ecssd, out = Path(args.ecssd), Path(args.out)
    names = sorted(p.name for p in (ecssd / "images").iterdir())
    test_img = split(ecssd / "images", out / "test_images", names[:100])
    fit_img = split(ecssd / "images", out / "fit_images", names[100:])
    fit_gt = split(ecssd / "masks", out / "fit_masks", [n.replace(".jpg", ".png") for n in names[100:]])

    masks_round = ["--rounds", "1", "--round-labels", "masks"]
    fits = [("ecssd_pseudo", ["--source", "folder", "--root", str(fit_img)]),
            ("ecssd_masks", ["--source", "folder", "--root", str(fit_img), *masks_round]),
            ("ecssd_gt", ["--source", "folder", "--root", str(fit_img), "--gt", str(fit_gt)])]  # fmt: skip
    for name, extra in fits:
        model = out / f"{name}.npz"
        if not model.exists():
            assert (
                maskgen(["drfi", "fit", *extra, "--levels", "multi", "--trees", "100", "--out", str(model)])
                == 0
            )

    test_src = ["--source", "folder", "--root", str(test_img), "--gt", str(ecssd / "masks")]
    sample_src = ["--source", "sample", "--sample-size", str(args.sample_size), "--seed", "1"]
    variants = [
        ("center", "center", []),
        ("drfi heuristic, harl level", "drfi", ["scorer=heuristic", "levels=harl"]),
        ("drfi heuristic, 3 levels", "drfi", ["scorer=heuristic", "levels=multi"]),
        ("drfi pseudo_rf (default forest), harl", "drfi", ["levels=harl"]),
        ("drfi pseudo_rf (default forest), 3 levels", "drfi", ["levels=multi"]),
        ("drfi pseudo_rf (default forest) + heuristic, 3 levels, refine", "drfi",
         ["scorer=forest+heuristic", "levels=multi", "refine=1"]),
        ("drfi pseudo_rf (default forest), HARL level, refine", "drfi", ["levels=harl", "refine=1"]),
        ("drfi pseudo_rf (fit on ECSSD 101-500, no GT) + heuristic, 3 levels, refine", "drfi",
         [f"model={out / 'ecssd_pseudo.npz'}", "scorer=forest+heuristic", "levels=multi", "refine=1"]),
        ("drfi pseudo_rf (fit on ECSSD 101-500, no GT), 3 levels", "drfi",
         [f"model={out / 'ecssd_pseudo.npz'}", "levels=multi"]),
        ("drfi pseudo_rf, masks round (fit on ECSSD 101-500, no GT), 3 levels, refine", "drfi",
         [f"model={out / 'ecssd_masks.npz'}", "levels=multi", "refine=1"]),
        ("drfi forest fit with GT on ECSSD 101-500, 3 levels", "drfi", [f"model={out / 'ecssd_gt.npz'}", "levels=multi"]),
    ]  # fmt: skip
    rows = []
    for label, method, params in variants:
        r_e = build(out / "runs" / f"ecssd-{len(rows)}", method, params, test_src)
        r_s = None
        if "ECSSD" not in label:
            r_s = build(out / "runs" / f"sample-{len(rows)}", method, params, sample_src)
        rows.append((label, r_e, r_s))
    shutil.rmtree(out / "runs", ignore_errors=True)

    print("\n| variant | ECSSD 1-100: mIoU | MAE | max F | S | sample: mIoU | MAE | max F | S |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, e, s in rows:
        cells = [f"{e[k]:.3f}" for k in ("miou", "mae", "max_fbeta", "s_measure")]
        cells += [f"{s[k]:.3f}" for k in ("miou", "mae", "max_fbeta", "s_measure")] if s else ["—"] * 4
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
