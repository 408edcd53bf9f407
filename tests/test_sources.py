"""Sources: sorted lazy listings, keys, labels and ground truth for every layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import gradient_rgb, jpeg_bytes, png_bytes, shared
from PIL import Image
from skimage.draw import polygon as draw_polygon

from maskgen.sources import SourceError, make_source
from maskgen.sources.coco import union_mask
from maskgen.sources.sample import PHOTOS
from maskgen.sources.synthetic import APPEARANCES, SHAPES, render_scene, scene_classes


def put(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ----------------------------------------------------------------------------- sample


@pytest.mark.parametrize("labels, names", [("appearance", APPEARANCES), ("shape", SHAPES)])
def test_sample_is_deterministic_and_labelled(labels, names):
    src = make_source("sample", {"sample_size": 5, "seed": 3, "labels": labels})
    items = src.list_items()
    assert [it.path for it in items] == sorted(it.path for it in items)
    assert len(items) == len(PHOTOS) + 5
    synth = [it for it in items if it.path.startswith("scenes/")]
    for it in synth:
        rgb, mask, classes = render_scene(3, it.gt)
        assert it.label == getattr(classes, labels)
        np.testing.assert_array_equal(src.ground_truth(it), mask)
        assert src.read(it) == src.read(it)
    photo = items[-1]
    assert photo.label == len(names) and src.ground_truth(photo) is None
    assert src.read(photo)[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xe1")
    assert src.class_names == [*names, "photo"]


def test_sample_rejects_an_unknown_labelling():
    with pytest.raises(SourceError, match="--sample-labels"):
        make_source("sample", {"sample_size": 5, "labels": "colour"})


def test_synthetic_scenes_have_sane_masks_and_cover_every_class():
    seen = set()
    border_touching = 0
    for i in range(60):
        rgb, mask, classes = render_scene(0, i)
        assert rgb.dtype == np.uint8 and rgb.shape[:2] == mask.shape
        assert 0.03 <= mask.mean() <= 0.6
        assert scene_classes(0, i) == classes  # the cheap listing draws what the render draws
        seen.add(classes)
        border_touching += bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    assert {c.shape for c in seen} == set(range(len(SHAPES)))
    assert {c.appearance for c in seen} == set(range(len(APPEARANCES)))
    assert 4 <= border_touching <= 30  # about a fifth are cut by the border
    assert not np.array_equal(render_scene(0, 1)[0], render_scene(1, 1)[0])


# ----------------------------------------------------------------------------- folder


def test_folder_keys_gt_matching_and_class_folders(tmp_path):
    root, gt = tmp_path / "img", tmp_path / "gt"
    put(root / "cats" / "a.jpg", jpeg_bytes(gradient_rgb(8, 8)))
    put(root / "cats" / "a.png", png_bytes(Image.new("RGB", (8, 8))))  # same stem, other extension
    put(root / "dogs" / "b c.JPEG", jpeg_bytes(gradient_rgb(8, 8)))
    put(root / "dogs" / "notes.txt", b"ignored")
    put(gt / "cats" / "a.png", png_bytes(Image.new("L", (8, 8), 255)))
    put(gt / "dogs" / "b c.bmp", png_bytes(Image.new("L", (8, 8), 0)))
    src = make_source("folder", {"root": str(root), "gt": str(gt), "class_folders": True})
    items = src.list_items()
    assert [it.path for it in items] == ["cats/a.jpg", "cats/a.png", "dogs/b c.JPEG"]
    assert [it.key for it in items] == ["cats__a", "cats__a_1", "dogs__b_c"]
    assert [it.label for it in items] == [0, 0, 1] and src.class_names == ["cats", "dogs"]
    assert src.ground_truth(items[0]).all() and not src.ground_truth(items[2]).any()
    no_labels = make_source("folder", {"root": str(root)})
    assert no_labels.class_names is None and {it.label for it in no_labels.list_items()} == {None}


def test_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="no such directory"):
        make_source("folder", {"root": str(tmp_path / "missing")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        make_source("folder", {"root": str(tmp_path / "empty")}).list_items()
    put(tmp_path / "loose" / "x.jpg", b"")
    with pytest.raises(SourceError, match="not inside a class folder"):
        make_source("folder", {"root": str(tmp_path / "loose"), "class_folders": True}).list_items()


# ----------------------------------------------------------------------------- imagenet


def make_imagenet(root, wnids=("n02000000", "n01000000"), per_class=2):
    for w in wnids:
        for i in range(per_class):
            put(root / "train" / w / f"{w}_{i}.JPEG", jpeg_bytes(gradient_rgb(8, 8, i)))
    return sorted(wnids)


def test_imagenet_train_labels_follow_sorted_wnids(tmp_path):
    wnids = make_imagenet(tmp_path)
    src = make_source("imagenet", {"root": str(tmp_path)})
    items = src.list_items()
    assert src.class_names == wnids
    assert [(it.key, it.label) for it in items] == [
        ("n01000000_0", 0), ("n01000000_1", 0), ("n02000000_0", 1), ("n02000000_1", 1)
    ]  # fmt: skip
    assert items[0].path == "train/n01000000/n01000000_0.JPEG" and src.read(items[0])[:2] == b"\xff\xd8"


def test_imagenet_class_subset(tmp_path):
    wnids = make_imagenet(tmp_path)
    (tmp_path / "subset.txt").write_text(f"# one class\n{wnids[1]}\n")
    src = make_source("imagenet", {"root": str(tmp_path), "classes": str(tmp_path / "subset.txt")})
    assert src.class_names == [wnids[1]] and src.config()["classes"] == [wnids[1]]
    assert [(it.key, it.label) for it in src.list_items()] == [("n02000000_0", 0), ("n02000000_1", 0)]
    (tmp_path / "bad.txt").write_text("n09999999")
    with pytest.raises(SourceError, match="bad.txt: unknown class 'n09999999'"):
        make_source("imagenet", {"root": str(tmp_path), "classes": str(tmp_path / "bad.txt")})


def test_imagenet_flat_val_with_kaggle_csv_and_two_column_file(tmp_path):
    make_imagenet(tmp_path)
    for i in (1, 2):
        put(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", jpeg_bytes(gradient_rgb(8, 8)))
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n02000000 1 2 3 4\nILSVRC2012_val_00000002,n01000000 0 0 1 1\n"
    )
    items = make_source("imagenet", {"root": str(tmp_path), "split": "val"}).list_items()
    assert [it.label for it in items] == [1, 0]
    two_col = tmp_path / "labels.txt"
    two_col.write_text("ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG n02000000\n")
    items = make_source(
        "imagenet", {"root": str(tmp_path), "split": "val", "val_labels": str(two_col)}
    ).list_items()
    assert [it.label for it in items] == [0, 1]


def test_imagenet_devkit_ground_truth_with_meta_mat(tmp_path):
    from scipy.io import savemat

    make_imagenet(tmp_path)
    for i in (1, 2, 3):
        put(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", jpeg_bytes(gradient_rgb(8, 8)))
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    synsets = np.zeros(2, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    synsets[0] = (1, "n02000000")  # devkit IDs are not in sorted-wnid order
    synsets[1] = (2, "n01000000")
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n1\n")
    cfg = {
        "root": str(tmp_path),
        "split": "val",
        "val_labels": str(devkit / "ILSVRC2012_validation_ground_truth.txt"),
    }
    assert [it.label for it in make_source("imagenet", cfg).list_items()] == [1, 0, 1]


def test_imagenet_s_ground_truth(tmp_path):
    make_imagenet(tmp_path, per_class=1)
    ids = np.array([[0, 5, 1000], [300, 0, 0]], np.int32)  # bg, class 5, ignore / class 300
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], axis=2).astype(np.uint8)
    put(tmp_path / "gt" / "n01000000" / "n01000000_0.png", png_bytes(Image.fromarray(rgb)))
    src = make_source("imagenet", {"root": str(tmp_path), "gt": str(tmp_path / "gt")})
    items = src.list_items()
    np.testing.assert_array_equal(src.ground_truth(items[0]), [[False, True, False], [True, False, False]])
    assert src.ground_truth(items[1]) is None


def test_imagenet_missing_split_is_one_line_error(tmp_path):
    with pytest.raises(SourceError, match="split folder"):
        make_source("imagenet", {"root": str(tmp_path)})


def test_imagenette_real_layout():
    root = shared("imagenette-224")
    src = make_source("imagenet", {"root": str(root)})
    items = src.list_items()
    assert len(src.class_names) == 10 and src.class_names == sorted(src.class_names)
    assert len(items) == 2600 and {it.label for it in items} == set(range(10))
    val = make_source("imagenet", {"root": str(root), "split": "val"}).list_items()
    assert len(val) == 500 and len({it.key for it in val}) == 500


# ----------------------------------------------------------------------------- coco


def test_coco_union_with_polygon_crowd_and_category_filter(tmp_path):
    h, w = 20, 30
    put(tmp_path / "img" / "1.jpg", jpeg_bytes(gradient_rgb(h, w)))
    put(tmp_path / "img" / "2.jpg", jpeg_bytes(gradient_rgb(h, w)))
    crowd = np.zeros((h, w), np.uint8)
    crowd[2:6, 20:28] = 1
    flat = crowd.ravel(order="F")  # uncompressed RLE: run lengths over the column-major pixels
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    poly = [2.0, 3.0, 12.0, 3.0, 12.0, 15.0, 2.0, 15.0]
    ann = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": h, "width": w},
                   {"id": 2, "file_name": "2.jpg", "height": h, "width": w}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [poly], "area": 120, "bbox": [2, 3, 10, 12]},
            {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": {"size": [h, w], "counts": counts},
             "area": 32, "bbox": [20, 2, 8, 4]},
        ],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    src = make_source("coco", {"root": str(tmp_path / "img"), "annotations": str(tmp_path / "ann.json")})
    items = src.list_items()
    assert [it.key for it in items] == ["1", "2"]
    gt = src.ground_truth(items[0])
    assert (gt & crowd.astype(bool)).sum() == crowd.sum()  # the crowd region is foreground
    rr, cc = draw_polygon(np.array(poly[1::2]), np.array(poly[0::2]), (h, w))
    ref = np.zeros((h, w), bool)
    ref[rr, cc] = True
    poly_part = gt & ~crowd.astype(bool)
    assert (poly_part & ref).sum() / (poly_part | ref).sum() > 0.8  # rasterisers differ on edges only
    assert not src.ground_truth(items[1]).any()  # no annotations: all background
    dogs = make_source("coco", {"root": str(tmp_path / "img"), "annotations": str(tmp_path / "ann.json"),
                                "categories": ["dog"]}).list_items()  # fmt: skip
    assert [it.key for it in dogs] == ["1"]
    np.testing.assert_array_equal(union_mask(dogs[0].gt["segmentations"], h, w), crowd.astype(bool))
    with pytest.raises(SourceError, match="unknown category"):
        make_source("coco", {"root": str(tmp_path / "img"), "annotations": str(tmp_path / "ann.json"),
                             "categories": ["cat"]}).list_items()  # fmt: skip
