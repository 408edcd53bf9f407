"""benchmarks/box_masks.py: the boxed photos of one split as a class-folder tree, each with the
union of its boxes as a mask that `maskgen build --method gt --param exact=true` shards as is."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskgen.boxscore import box_mask
from maskgen.cli import main as maskgen
from maskio.shard_format import FIELD_MASK, decode_mask_png, iter_tar_samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from box_masks import main  # noqa: E402 -- a benchmark, found through sys.path


def test_boxed_photos_and_their_box_masks_build_exactly(tmp_path):
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for rel in ("train/cat/a.jpg", "train/cat/b.jpg", "train/dog/c.jpg", "val/dog/d.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(root / rel)
    csv = tmp_path / "boxes.csv"
    csv.write_text(
        "path,x0,y0,x1,y1\n"
        "train/cat/a.jpg,2.4,3.5,20.6,12.2\n"
        "train/cat/a.jpg,15.0,10.0,39.9,29.5\n"  # a second box: the mask is the union
        "train/dog/c.jpg,0,0,10.5,30\n"
        "val/dog/d.jpg,1,1,5,5\n"  # another split: left out
    )  # b.jpg has no box: left out
    out = tmp_path / "boxed"
    main(["--boxes", str(csv), "--root", str(root), "--split", "train", "--out", str(out)])
    photos = sorted(p.relative_to(out / "photos").as_posix() for p in (out / "photos").rglob("*.jpg"))
    assert photos == ["cat/a.jpg", "dog/c.jpg"]
    assert (out / "photos/cat/a.jpg").resolve() == (root / "train/cat/a.jpg").resolve()
    want = {
        "cat/a": box_mask([(2.4, 3.5, 20.6, 12.2), (15.0, 10.0, 39.9, 29.5)], (30, 40)),
        "dog/c": box_mask([(0, 0, 10.5, 30)], (30, 40)),
    }
    for stem, mask in want.items():
        written = np.asarray(Image.open(out / "boxes" / f"{stem}.png"))
        assert written.dtype == np.uint8 and np.array_equal(written, mask.astype(np.uint8) * 255)

    build = tmp_path / "build"
    assert maskgen(["build", "--source", "folder", "--root", str(out / "photos"), "--gt", str(out / "boxes"),
                    "--class-folders", "--method", "gt", "--param", "exact=true", "--out", str(build),
                    "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    masks = [
        decode_mask_png(fields[FIELD_MASK])
        for tar in sorted((build / "shards").glob("*.tar"))
        for _, fields in iter_tar_samples(tar)
    ]
    assert len(masks) == 2  # byte for byte the boxes: no post-processing, no fallback
    assert all(any(np.array_equal(m, w) for m in masks) for w in want.values())


def test_a_bad_box_csv_or_a_missing_photo_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,x0,y0,x1,y1\ntrain/a.jpg,5,5,1,1\n")
    with pytest.raises(SystemExit) as exc:
        main(["--boxes", str(bad), "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert str(exc.value).startswith("box_masks: ") and "bad.csv:2" in str(exc.value)
    assert "\n" not in str(exc.value)
    missing = tmp_path / "missing.csv"
    missing.write_text("path,x0,y0,x1,y1\ntrain/a.jpg,1,1,5,5\n")
    with pytest.raises(SystemExit) as exc:
        main(["--boxes", str(missing), "--root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "a.jpg" in str(exc.value) and "\n" not in str(exc.value)
    assert not list((tmp_path / "o").rglob("*.png"))
