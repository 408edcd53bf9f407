"""A folder of broken and awkward files: the build finishes, records the bad, masks the good."""

from __future__ import annotations

import io
import json
import os
import subprocess

import numpy as np
import pytest
import webdataset as wds
from conftest import exif_rotated_jpeg, gradient_rgb, jpeg_bytes, maskgen_cmd, png_bytes, png_with_forged_size
from PIL import Image

from maskgen.postprocess import center_prior, quantize
from maskio.shard_format import shard_paths

GOOD = {
    "good_rgb.jpg": (jpeg_bytes(gradient_rgb(40, 60)), (40, 60)),
    "gray.jpg": (jpeg_bytes(gradient_rgb(30, 30)[:, :, 0]), (30, 30)),
    "rgba.png": (png_bytes(Image.fromarray(gradient_rgb(20, 24)).convert("RGBA")), (20, 24)),
    "palette.png": (png_bytes(Image.fromarray(gradient_rgb(20, 24)).convert("P")), (20, 24)),
    "deep16.png": (
        png_bytes(Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))),
        (20, 30),
    ),
    "tiny.png": (png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))), (1, 1)),
    "rotated.jpg": (exif_rotated_jpeg(gradient_rgb(20, 50), 6), (50, 20)),  # stored 20x50, shown 50x20
}


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient_rgb(24, 32)).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


GOOD["cmyk.jpg"] = (cmyk_jpeg(), (24, 32))
BAD = {
    "truncated.jpg": (jpeg_bytes(gradient_rgb(64, 64))[:-700], "truncated_or_corrupt"),
    "zero.jpg": (b"", "empty_file"),
    "text.jpg": (b"hello, I am not a JPEG\n", "not_an_image"),
    "bomb.png": (png_with_forged_size(30000, 30000), "decompression_bomb"),
}


@pytest.fixture(scope="module")
def messy_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "images"
    root.mkdir()
    for name, (data, _) in {**GOOD, **BAD}.items():
        (root / name).write_bytes(data)
    os.symlink(root / "does-not-exist.jpg", root / "broken_link.jpg")  # unreadable for any user
    if os.geteuid() != 0:  # root reads mode-000 files, so only test that as a normal user
        (root / "noperm.jpg").write_bytes(GOOD["good_rgb.jpg"][0])
        (root / "noperm.jpg").chmod(0)
    out = root.parent / "out"
    res = subprocess.run(maskgen_cmd("build", "--source", "folder", "--root", str(root), "--method", "center",
                                     "--out", str(out), "--shard-size", "5", "--workers", "2", "--no-progress"),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    return root, out, res


def test_build_succeeds_and_summary_counts_skipped(messy_build):
    _, out, res = messy_build
    assert res.returncode == 0, res.stderr
    n_bad = len(BAD) + 1 + (os.geteuid() != 0)
    assert f"skipped {n_bad} (" in res.stderr


def test_every_bad_file_is_recorded_with_its_reason(messy_build):
    _, out, _ = messy_build
    errors = {e["path"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    for name, (_, reason) in BAD.items():
        assert errors[name]["reason"] == reason and errors[name]["stage"] == "decode"
    assert (
        errors["broken_link.jpg"]["stage"] == "read" and errors["broken_link.jpg"]["reason"] == "unreadable"
    )
    if os.geteuid() != 0:
        assert errors["noperm.jpg"]["reason"] == "unreadable"
    report = json.loads((out / "report.json").read_text())
    assert report["n_errors"] == len(errors) and report["n_images"] == len(GOOD)


def test_every_good_or_awkward_file_gets_a_correct_mask(messy_build):
    _, out, _ = messy_build
    seen = {}
    for s in wds.WebDataset([str(p) for p in shard_paths(out)], shardshuffle=False):
        meta = json.loads(s["json"])
        img = Image.open(io.BytesIO(s["jpg"]))
        mask = np.asarray(Image.open(io.BytesIO(s["mask.png"])))
        h, w = GOOD[meta["path"]][1]
        assert (img.height, img.width) == (h, w) == mask.shape == (meta["height"], meta["width"]), meta[
            "path"
        ]
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        if min(h, w) > 1:  # the centre-prior mask of the image's own (upright) size
            np.testing.assert_array_equal(mask > 0, quantize(center_prior(h, w)) >= 128)
        seen[meta["path"]] = meta
    assert set(seen) == set(GOOD)
    assert seen["good_rgb.jpg"]["reencoded"] is False and seen["gray.jpg"]["reencoded"] is False
    for name in ("rotated.jpg", "cmyk.jpg", "rgba.png", "deep16.png"):
        assert seen[name]["reencoded"] is True, name
    # EXIF: the stored image is upright (no orientation tag left), so image and mask agree for any reader
    (rot,) = [
        s
        for s in wds.WebDataset([str(p) for p in shard_paths(out)], shardshuffle=False)
        if b"rotated" in s["json"]
    ]
    assert Image.open(io.BytesIO(rot["jpg"])).getexif().get(0x0112, 1) == 1


def test_original_jpeg_bytes_are_kept(messy_build):
    root, out, _ = messy_build
    (good,) = [s for s in wds.WebDataset([str(p) for p in shard_paths(out)], shardshuffle=False)
               if s["__key__"] == "good_rgb"]  # fmt: skip
    assert good["jpg"] == (root / "good_rgb.jpg").read_bytes()
