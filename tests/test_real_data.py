"""Builds on the real public sets in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

import json

import pytest
import webdataset as wds
from conftest import shared

from maskgen.cli import main
from maskio.shard_format import shard_paths


def test_center_baseline_on_ecssd_matches_the_published_centre_prior(tmp_path):
    data = shared("ecssd-dev")
    out = tmp_path / "ecssd"
    assert main(["build", "--source", "folder", "--root", str(data / "images"), "--gt", str(data / "masks"),
                 "--method", "center", "--out", str(out), "--limit", "60", "--executor", "local",
                 "--no-progress"]) == 0  # fmt: skip
    r = json.loads((out / "report.json").read_text())
    assert r["n_images"] == r["n_with_gt"] == 60 and r["n_errors"] == 0
    # ../shared/data/README.md: a Gaussian centre prior scores mIoU 0.42, MAE 0.31, max F 0.58, S 0.62
    assert 0.30 < r["miou"] < 0.55
    assert 0.22 < r["mae"] < 0.40
    assert 0.45 < r["max_fbeta"] < 0.70
    assert 0.52 < r["s_measure"] < 0.70


def test_imagenet_source_on_imagenette_val(tmp_path):
    root = shared("imagenette-224")
    out = tmp_path / "inette"
    assert main(["build", "--source", "imagenet", "--root", str(root), "--split", "val", "--method", "center",
                 "--out", str(out), "--limit", "30", "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    wnids = sorted(p.name for p in (root / "val").iterdir())
    n = 0
    for s in wds.WebDataset([str(p) for p in shard_paths(out)], shardshuffle=False):
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"] == wnids.index(meta["path"].split("/")[1])
        assert s["jpg"] == (root / meta["path"]).read_bytes()  # original JPEG bytes, no re-encode
        n += 1
    assert n == 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == wnids


@pytest.mark.parametrize("name", ["ecssd-dev/images", "imagenette-224/train/n01440764"])
def test_every_real_image_decodes(name):
    from maskgen.imaging import decode_image

    folder = shared(name.split("/")[0]) / "/".join(name.split("/")[1:])
    files = sorted(folder.iterdir())[:50]
    for f in files:
        assert decode_image(f.read_bytes()).rgb.ndim == 3
