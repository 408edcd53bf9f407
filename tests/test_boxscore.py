"""Mask quality against bounding boxes (issue 41 item 4): the rasterised union of boxes, the
per-photo precision / recall / IoU against a slow reference, path matching by tail, one-line
refusals of bad box files, and ``maskgen eval --boxes`` on a build."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from maskgen.boxscore import BoxIndex, box_mask, box_scores, read_box_csv
from maskgen.cli import main
from maskgen.pipeline import BuildError


def slow_box_mask(boxes, shape):
    """Pixel (r, c) is in a box when its centre (c + .5, r + .5) lies inside it."""
    out = np.zeros(shape, bool)
    for r in range(shape[0]):
        for c in range(shape[1]):
            out[r, c] = any(x0 <= c + 0.5 < x1 and y0 <= r + 0.5 < y1 for x0, y0, x1, y1 in boxes)
    return out


def test_box_union_matches_pixel_centres():
    boxes = [(1.2, 0.0, 5.6, 3.4), (4.0, 2.5, 9.9, 7.0), (7.5, 6.0, 30.0, 30.0)]
    np.testing.assert_array_equal(box_mask(boxes, (9, 11)), slow_box_mask(boxes, (9, 11)))


def test_scores_against_counts():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 30)) < 0.4
    boxes = slow_box_mask([(3, 2, 17, 15), (10, 8, 28, 19)], (20, 30))
    inter = sum(bool(m and b) for m, b in zip(mask.ravel(), boxes.ravel(), strict=True))
    got = box_scores(mask, boxes)
    assert got["precision"] == pytest.approx(inter / mask.sum())
    assert got["recall"] == pytest.approx(inter / boxes.sum())
    assert got["iou"] == pytest.approx(inter / (mask | boxes).sum())
    assert math.isnan(box_scores(np.zeros_like(mask), boxes)["precision"])


def test_paths_match_by_their_longest_unique_tail():
    index = BoxIndex({"train/n01/a.JPEG": [(0, 0, 1, 1)], "val/n01/a.JPEG": [(0, 0, 2, 2)],
                      "val/n02/b.JPEG": [(0, 0, 3, 3)]})  # fmt: skip
    assert index.find("imagenette/val/n01/a.JPEG") == [(0, 0, 2, 2)]
    assert index.find("n02/b.JPEG") == [(0, 0, 3, 3)]
    assert index.find("n01/a.JPEG") is None  # in train and val: ambiguous
    assert index.find("c.JPEG") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("path,x0,y0\na.jpg,1,2\n", "no column x1, y1"),
        ("path,x0,y0,x1,y1\na.jpg,1,2,x,4\n", ":2: x0, y0, x1, y1 must be numbers"),
        ("path,x0,y0,x1,y1\na.jpg,1,2,3,4\nb.jpg,5,5,5,9\n", ":3: not a box"),
        ("path,x0,y0,x1,y1\na.jpg,-1,2,3,4\n", ":2: not a box"),
        ("path,x0,y0,x1,y1\na.jpg,1,2,nan,4\n", ":2: not a box"),
        ("path,x0,y0,x1,y1\n", "no boxes"),
    ],
)
def test_bad_box_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "boxes.csv"
    path.write_text(text)
    with pytest.raises(BuildError, match=message) as info:
        read_box_csv(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_eval_boxes_on_a_build(tmp_path, capsys):
    """Two 40x40 photos; the centre prior's masks scored against boxes written by hand."""
    root = tmp_path / "img" / "cls"
    root.mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(root / f"{name}.png")
    out = tmp_path / "out"
    assert main(["build", "--source", "folder", "--root", str(tmp_path / "img"), "--method", "center",
                 "--out", str(out), "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x0,y0,x1,y1\nphotos/cls/a.png,0,0,40,40\nphotos/cls/b.png,0,0,20,40\n")
    capsys.readouterr()
    assert main(["eval", str(out), "--boxes", str(boxes), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    from maskio.shard_format import FIELD_MASK, decode_mask_png, iter_tar_samples, shard_paths

    masks = {k: decode_mask_png(f[FIELD_MASK]) for t in shard_paths(out) for k, f in iter_tar_samples(t)}
    mask = next(iter(masks.values()))  # the centre prior: the same mask for both photos
    full, half = slow_box_mask([(0, 0, 40, 40)], (40, 40)), slow_box_mask([(0, 0, 20, 40)], (40, 40))
    expect = [box_scores(mask, full), box_scores(mask, half)]
    assert got["n_with_boxes"] == 2 and got["n_images"] == 2
    assert got["box_iou"] == pytest.approx(np.mean([e["iou"] for e in expect]))
    assert got["box_precision"] == pytest.approx(np.mean([e["precision"] for e in expect]))
    assert got["box_recall"] == pytest.approx(np.mean([e["recall"] for e in expect]))
    assert main(["eval", str(out), "--boxes", str(boxes), "--gt", str(tmp_path)]) == 2
    (tmp_path / "none.csv").write_text("path,x0,y0,x1,y1\nelse/x.png,0,0,1,1\n")
    assert main(["eval", str(out), "--boxes", str(tmp_path / "none.csv")]) == 1
    assert "no sample's path matches" in capsys.readouterr().err
