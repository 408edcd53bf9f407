"""Localisation (SegAS's protocol): box sources, boxes from heatmaps, CAM and agnostic Loc
against slow per-image computations, and the CLI on ECSSD."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import maskgen_cmd, shared
from PIL import Image

from maskio.records import index_any
from sslmask.backbones import build_backbone, normalize
from sslmask.eval.linear import fit_linear
from sslmask.eval.localization import (
    box_from_heatmap,
    boxes_from_cub,
    boxes_from_imagenet_xml,
    boxes_from_loc_csv,
    boxes_from_masks,
    iou,
    localization_eval,
    match_boxes,
    record_keys,
)


def _slow_largest_box(on: np.ndarray):
    """4-connected flood fill in plain Python; the largest component's tight box."""
    h, w = on.shape
    seen = np.zeros_like(on, dtype=bool)
    best = None
    for y in range(h):
        for x in range(w):
            if on[y, x] and not seen[y, x]:
                stack, cells = [(y, x)], []
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    cells.append((cy, cx))
                    for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                        if 0 <= ny < h and 0 <= nx < w and on[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
                if best is None or len(cells) > len(best):
                    best = cells
    ys, xs = [c[0] for c in best], [c[1] for c in best]
    return (min(xs), min(ys), max(xs) + 1, max(ys) + 1)


def test_box_from_heatmap_is_the_largest_components_tight_box():
    rng = np.random.default_rng(0)
    for _ in range(5):
        heat = rng.random((20, 24)) ** 3
        assert box_from_heatmap(heat, 0.5) == pytest.approx(_slow_largest_box(heat >= 0.5))
    assert box_from_heatmap(np.zeros((4, 6)), 0.5) == (0.0, 0.0, 6.0, 4.0)  # nothing on: the whole image


def test_iou_of_hand_made_boxes():
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_box_sources_parse_cub_imagenet_xml_csv_and_masks(tmp_path):
    (tmp_path / "images.txt").write_text("1 001.Albatross/Black_0046_18.jpg\n2 002.Auklet/Crested_0001.jpg\n")
    (tmp_path / "bounding_boxes.txt").write_text("1 60.0 27.0 325.0 304.0\n2 1 2 3 4\n")
    cub = boxes_from_cub(tmp_path)
    assert cub == {
        "001_Albatross__Black_0046_18": [(60.0, 27.0, 385.0, 331.0)],
        "002_Auklet__Crested_0001": [(1, 2, 4, 6)],
    }
    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "ILSVRC2012_val_00000001.xml").write_text(
        "<annotation><object><name>n01751748</name><bndbox><xmin>10</xmin><ymin>20</ymin><xmax>30</xmax>"
        "<ymax>40</ymax></bndbox></object><object><bndbox><xmin>0</xmin><ymin>0</ymin><xmax>4</xmax>"
        "<ymax>5</ymax></bndbox></object></annotation>"
    )
    assert boxes_from_imagenet_xml(xml) == {"ILSVRC2012_val_00000001": [(10, 20, 31, 41), (0, 0, 5, 6)]}
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01 1 2 3 4 n01 5 6 7 8 \n")
    assert boxes_from_loc_csv(csv_path) == {"ILSVRC2012_val_00000002": [(1, 2, 4, 5), (5, 6, 8, 9)]}
    masks = tmp_path / "masks" / "cls"
    masks.mkdir(parents=True)
    m = np.zeros((10, 12), np.uint8)
    m[1:3, 2:5] = 255
    m[6:9, 7:12] = 200
    m[0, 11] = 100  # below 128: background
    Image.fromarray(m).save(masks / "a.png")
    assert sorted(boxes_from_masks(tmp_path / "masks")["cls__a"]) == [(2, 1, 5, 3), (7, 6, 12, 9)]


def test_match_boxes_by_key_then_by_a_unique_file_stem():
    boxes = {"n01__ILSVRC_1": [(0, 0, 1, 1)], "ILSVRC_2": [(0, 0, 2, 2)], "a__image_1": [(1, 1, 2, 2)],
             "b__image_1": [(0, 0, 3, 3)]}  # fmt: skip
    got = match_boxes(["n01__ILSVRC_1", "n05__ILSVRC_2", "c__image_1", "ILSVRC_3"], boxes)
    assert got == [[(0, 0, 1, 1)], [(0, 0, 2, 2)], None, None]  # image_1 is ambiguous


def _object_set(root, n_per_class=6, size=40, seed=0):
    """Class folders of bright squares (class 0) and discs (class 1) on noise, with masks."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    for c in range(2):
        (images / f"c{c}").mkdir(parents=True)
        (masks / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, 80, (size, size + 8, 3)).astype(np.uint8)
            m = np.zeros((size, size + 8), np.uint8)
            y, x, r = rng.integers(4, 14), rng.integers(4, 20), rng.integers(8, 13)
            if c == 0:
                m[y : y + 2 * r, x : x + 2 * r] = 255
            else:
                yy, xx = np.mgrid[:size, : size + 8]
                m[(yy - y - r) ** 2 + (xx - x - r) ** 2 <= r * r] = 255
            img[m > 0] = (230, 200 - 150 * c, 40 + 150 * c)
            Image.fromarray(img).save(images / f"c{c}" / f"{i}.png")
            Image.fromarray(m).save(masks / f"c{c}" / f"{i}.png")
    return images, masks


def _slow_loc(backbone, records, boxes, size, probe):
    """Per image: its own forward, heatmap by an explicit sum over channels, box, IoU."""
    from maskio.records import FileReader, decode_rgb

    reader = FileReader(records.files)
    hits = []
    for i in range(len(records)):
        image = decode_rgb(reader.read(*records.image[i]), records.names[i])
        w, h = image.size
        x = normalize(
            torch.from_numpy(np.asarray(image.resize((size, size), Image.BICUBIC)).copy()).permute(2, 0, 1)[
                None
            ]
        )
        grid = backbone(x)[0]
        if probe is None:
            heat = sum(grid[k] for k in range(grid.shape[0])) / grid.shape[0]
        else:
            c = int(probe.index(torch.tensor([int(records.labels[i])]))[0])
            heat = sum((probe.layer.weight[c, k] / probe.std[k]) * grid[k] for k in range(grid.shape[0]))
        up = F.interpolate(heat[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        up = ((up - up.min()) / (up.max() - up.min())).numpy()
        pred = _slow_largest_box(up >= 0.2)
        gt = [(x0 * size / w, y0 * size / h, x1 * size / w, y1 * size / h) for x0, y0, x1, y1 in boxes[i]]
        hits.append(max(iou(pred, b) for b in gt) >= 0.5)
    return 100.0 * sum(hits) / len(hits)


@pytest.mark.parametrize("agnostic", [True, False])
def test_localization_eval_matches_a_per_image_reference(agnostic, tmp_path):
    images, masks = _object_set(tmp_path)
    records = index_any([str(images)])
    boxes = match_boxes(record_keys(records), boxes_from_masks(masks))
    assert all(boxes)
    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny").eval()
    probe = None
    if not agnostic:
        feats = torch.randn(12, backbone.num_features)
        probe = fit_linear(feats, torch.tensor([0, 1] * 6), epochs=3)
    options = {"image_size": 48, "threshold": 0.2, "iou": 0.5, "batch_size": 5, "workers": 0, "device": "cpu"}
    got = localization_eval(backbone, records, boxes, probe, options)
    with torch.no_grad():
        want = _slow_loc(backbone, records, boxes, 48, probe)
    assert got["images"] == 12 and got["unmatched"] == 0
    assert got["loc" if agnostic else "gt_known"] == pytest.approx(round(want, 2))
    if not agnostic:
        assert got["top1_loc"] <= min(got["gt_known"], got["top1_cls"])


def test_localization_cli_cam_and_refusals(tmp_path, capsys):
    from sslmask.cli import main

    images, masks = _object_set(tmp_path)
    out = tmp_path / "loc.json"
    base = ["eval", "localization", "--checkpoint", "random", "--arch", "resnet_tiny", "--val", str(images),
            "--image-size", "48", "--workers", "0"]  # fmt: skip
    assert main([*base, "--train", str(images), "--gt-masks", str(masks), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (
        result["mode"] == "cam"
        and result["images"] == 12
        and {"gt_known", "top1_loc", "top1_cls"} <= set(result)
    )
    for bad in (
        [],
        ["--gt-masks", str(masks)],
        ["--gt-masks", str(masks), "--boxes", str(masks), "--agnostic"],
    ):
        capsys.readouterr()
        assert main([*base, *bad]) != 0
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_agnostic_localization_on_ecssd_matches_every_photo_and_reports_the_whole_image_floor(tmp_path):
    """Real photos: ECSSD built with the centre prior; the checks are the box plumbing on real
    sizes (every image matched) and the floor (the whole-image box) reported."""
    root = shared("ecssd-dev")
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(p.name for p in (root / "images").iterdir())[:40]:
        (images / name).symlink_to(root / "images" / name)
    build = tmp_path / "build"
    subprocess.run(maskgen_cmd("build", "--source", "folder", "--root", str(images), "--method", "center", "--out",
                               str(build), "--executor", "local", "--no-progress"), check=True, capture_output=True)  # fmt: skip
    records = index_any([str(build)])
    boxes = match_boxes(record_keys(records), boxes_from_masks(root / "masks"))
    assert all(boxes) and len(boxes) == 40
    torch.manual_seed(0)
    options = {
        "image_size": 64,
        "threshold": 0.2,
        "iou": 0.5,
        "batch_size": 16,
        "workers": 0,
        "device": "cpu",
    }
    result = localization_eval(build_backbone("resnet_tiny"), records, boxes, None, options)
    assert result["images"] == 40 and 0 <= result["loc"] <= 100 and 0 < result["whole_image"] < 100
