"""The photos of a folder that have object boxes, as their own class-folder tree, with the union of
each photo's boxes written as a mask: the input of a box-mask arm where boxes exist for only part
of a training set (ImageNet's boxes for 366 of Imagenette's 2,600 training photos).

    python benchmarks/box_masks.py --boxes ../shared/data/imagenette-224/boxes.csv \\
        --root ../shared/data/imagenette-224 --split train --out runs/boxed
    maskgen build --source folder --root runs/boxed/photos --gt runs/boxed/boxes --class-folders \\
        --method gt --param exact=true --out runs/boxed-box

The photos are linked, not copied (``photos/CLASS/NAME``); the masks are 8-bit PNGs
(``boxes/CLASS/STEM.png``, 255 inside any box) that ``--gt`` matches by relative path and stem.
A pixel is inside a box when its centre is, as ``maskgen eval --boxes`` rasterises boxes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from PIL import Image

from maskgen.boxscore import Box, box_mask, read_box_csv
from maskgen.pipeline import BuildError
from maskio.atomic import atomic_open


def write_tree(boxes: dict[str, list[Box]], root: Path, split: str, out: Path) -> int:
    """Link each photo of ``split`` that has boxes under ``out/photos`` and write the union of its
    boxes under ``out/boxes``; returns how many."""
    chosen = {rel: b for rel, b in boxes.items() if rel.startswith(f"{split}/")}
    for rel, photo_boxes in sorted(chosen.items()):
        sub = Path(rel).relative_to(split)
        src = (root / rel).resolve()
        link = out / "photos" / sub
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(src, link)
        with Image.open(src) as image:
            mask = box_mask(photo_boxes, (image.height, image.width)).astype("uint8") * 255
        target = out / "boxes" / sub.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target) as fh:  # a crash never leaves a partial mask under its name
            Image.fromarray(mask).save(fh, format="PNG")
    return len(chosen)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--boxes", type=Path, required=True, help="CSV: path,x0,y0,x1,y1 (path relative to --root)"
    )
    ap.add_argument("--root", type=Path, required=True, help="the folder the CSV's paths are relative to")
    ap.add_argument("--split", default="train", help="keep rows whose path starts with SPLIT/")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        n = write_tree(read_box_csv(args.boxes), args.root, args.split, args.out)
    except (BuildError, OSError) as exc:  # one line naming the file, not a traceback
        raise SystemExit(f"box_masks: {exc}") from None
    print(f"{n} photos with boxes -> {args.out}/photos, masks -> {args.out}/boxes")


if __name__ == "__main__":
    main()
