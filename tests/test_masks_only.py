"""Masks-only builds joined to the images they were built from (``--images ROOT``): training,
evaluation, inspection and deep fit read the same samples as from a full-image build, and a
missing, replaced or escaping image is one line naming the sample."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, tiny_train_args
from PIL import Image

from maskgen.sources.synthetic import render_scene
from maskio.errors import ShardError
from maskio.records import _joined_file, index_shards
from maskio.shard_format import iter_tar_samples, shard_paths


def write_tree(root: Path, per_class: int = 8) -> Path:
    """Two class folders of plain JPEGs (kept byte for byte by a full build)."""
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            rgb = render_scene(c, i)[0][:72, :96]
            (root / name / f"{i:03d}.jpg").write_bytes(jpeg_bytes(np.ascontiguousarray(rgb)))
    return root


def build(root: Path, out: Path, image_format: str) -> Path:
    from maskgen.cli import main

    rc = main(["build", "--source", "folder", "--root", str(root), "--class-folders", "--method", "center",
               "--image-format", image_format, "--shard-size", "6", "--out", str(out), "--executor", "local",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(image folder, full-image build, masks-only build) of the same photos."""
    base = tmp_path_factory.mktemp("masks_only")
    root = write_tree(base / "images")
    return root, build(root, base / "full", "keep"), build(root, base / "masks", "none")


def one_line_error(main, args, capsys) -> str:
    """The error line (a training run's progress bar may precede it), and no traceback."""
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_masks_only_shards_record_the_source_hash_and_carry_no_image(builds):
    root, _, masks = builds
    for shard in shard_paths(masks):
        for key, fields in iter_tar_samples(shard):
            assert "jpg" not in fields
            meta = json.loads(fields["json"])
            data = (root / meta["path"]).read_bytes()
            assert meta["source_sha256"] == hashlib.sha256(data).hexdigest(), key


def test_training_on_masks_plus_images_equals_training_on_the_full_build(builds, tmp_path):
    from sslmask.cli import main

    root, full, masks = builds
    sets = ["train.epochs=2", "train.deterministic=true", "data.batch_size=4"]
    assert main(tiny_train_args("harl", full, tmp_path / "a", *sets)) == 0
    assert main([*tiny_train_args("harl", masks, tmp_path / "b", *sets), "--images", str(root)]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["method"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["method"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the resumed run reads the cached index, which remembers the image folder
    assert main([*tiny_train_args("harl", masks, tmp_path / "b", "train.epochs=3", *sets[1:]),
                 "--images", str(root), "--resume", "auto"]) == 0  # fmt: skip


def test_knn_on_masks_plus_images_equals_the_full_build(builds, capsys):
    from sslmask.cli import main

    root, full, masks = builds
    common = ["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny", "--image-size", "32",
              "--workers", "0", "--k", "3"]  # fmt: skip
    assert main([*common, "--train", str(full), "--val", str(full)]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main([*common, "--train", str(masks), "--val", str(masks), "--images", str(root),
                 "--val-images", str(root)]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["accuracy"] == expected["accuracy"] and got["train"] == expected["train"] == 16


def test_inspect_and_deep_fit_read_the_joined_images(builds, tmp_path, capsys):
    from maskgen.cli import main as maskgen_main
    from sslmask.cli import main

    root, _, masks = builds
    assert main(["inspect", str(masks), "--images", str(root)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images_joined"] == 16 and summary["image_root"] == str(root.resolve())
    head = tmp_path / "head.safetensors"
    rc = maskgen_main(["deep", "fit", "--shards", str(masks), "--images", str(root), "--backbone", "random",
                       "--arch", "resnet_tiny", "--epochs", "1", "--batch-size", "4", "--short-side", "32",
                       "--workers", "0", "--out", str(head)])  # fmt: skip
    assert rc == 0 and head.is_file()


def test_bad_joins_are_one_line_naming_the_sample(builds, tmp_path, capsys):
    from sslmask.cli import main

    root, full, masks = builds
    err = one_line_error(main, ["inspect", str(masks), "--images", str(tmp_path)], capsys)
    assert "not found under" in err and "cats/000.jpg" in err
    err = one_line_error(main, tiny_train_args("byol", masks, tmp_path / "r0"), capsys)
    assert "has no image" in err and "--images" in err
    # another copy of the dataset whose file differs: caught when the image is read
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    Image.open(copy / "dogs" / "003.jpg").transpose(Image.FLIP_LEFT_RIGHT).save(copy / "dogs" / "003.jpg")
    err = one_line_error(main, [*tiny_train_args("byol", masks, tmp_path / "r1", "train.epochs=1"),
                                "--images", str(copy)], capsys)  # fmt: skip
    assert "sample dogs__003:" in err and "dogs/003.jpg is not the image its mask was built from" in err
    # a full build with --images anyway: its own images win, and it says so
    records = index_shards([str(full)], require_masks=False, images=root)
    assert records.image_root is None and "used for them" in capsys.readouterr().err


def test_a_json_path_may_not_leave_the_image_folder(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert _joined_file(tmp_path, "a.jpg", "s.tar", "k") == tmp_path / "a.jpg"
    for bad in ("../a.jpg", "/etc/passwd", "", None, "x/../../a.jpg"):
        with pytest.raises(ShardError, match="s.tar: sample k"):
            _joined_file(tmp_path, bad, "s.tar", "k")


def test_an_exif_rotated_photo_is_read_upright_as_the_build_saw_it(tmp_path):
    """The build turns the photo by its EXIF orientation and masks the upright image; reading
    the original file back must turn it the same way, or image and mask sizes disagree."""
    root = write_tree(tmp_path / "images", per_class=2)
    rgb = np.ascontiguousarray(render_scene(0, 9)[0][:40, :90])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: the upright image is 90 x 40
    Image.fromarray(rgb).save(root / "cats" / "rotated.jpg", quality=95, exif=exif)
    masks = build(root, tmp_path / "masks", "none")
    records = index_shards([str(masks)], require_masks=True, images=root)
    from sslmask.dataset import EvalDataset

    data = EvalDataset(records, 32, masks=True)
    rotated = records.names.index(next(n for n in records.names if "rotated" in n))
    image, label, mask = data[rotated]
    assert image.shape[-2:] == mask.shape[-2:] and label == 0


def test_the_index_cache_keeps_the_join_and_notices_another_image_folder(builds, tmp_path):
    from maskio.records import index_cached, load_index

    root, _, masks = builds
    cache = tmp_path / "index.npz"
    first = index_cached([str(masks)], True, cache, images=root)
    again = load_index(cache)
    assert again is not None and again.image_root == first.image_root == str(root.resolve())
    assert np.array_equal(again.image_sha256, first.image_sha256) and len(again.image_sha256) == 16
    assert again.subset([3, 1]).image_sha256.tolist() == first.image_sha256[[3, 1]].tolist()
    other = shutil.copytree(root, tmp_path / "other")
    moved = index_cached([str(masks)], True, cache, images=other)
    assert moved.image_root == str(other.resolve()) and moved.files[-1].startswith(str(other.resolve()))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "knn", "linear", "retrieval", "occlusion", "deep fit"])
def test_an_error_inside_a_dataloader_worker_is_still_one_line(builds, tmp_path, capsys, command):
    """Issue 44 item 2: with DataLoader workers, torch re-raised the worker's ShardError with its
    whole traceback as the message (17-42 lines); the one line inside is what the user sees."""
    from maskgen.cli import main as maskgen_main
    from sslmask.cli import main

    root, _, masks = builds
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    for name in ("cats/001.jpg", "dogs/003.jpg"):  # swapped under the masks-only build
        Image.open(copy / name).transpose(Image.FLIP_LEFT_RIGHT).save(copy / name)
    common = ["--checkpoint", "random", "--arch", "resnet_tiny", "--image-size", "32", "--workers", "2"]
    split = ["--train", str(masks), "--images", str(copy), "--val", str(masks), "--val-images", str(copy)]
    train = tiny_train_args("byol", masks, tmp_path / "r", "train.epochs=1", "data.workers=2")
    fit = ["deep", "fit", "--shards", str(masks), "--images", str(copy), "--backbone", "random", "--arch",
           "resnet_tiny", "--out", str(tmp_path / "h.safetensors"), "--epochs", "1", "--short-side", "32",
           "--workers", "2"]  # fmt: skip
    args = {
        "train": [*train, "--images", str(copy)],
        "knn": ["eval", "knn", *common, *split],
        "linear": ["eval", "linear", *common, *split],
        "retrieval": ["eval", "retrieval", *common, "--data", str(masks), "--images", str(copy)],
        "occlusion": ["eval", "occlusion", *common, *split],
        "deep fit": fit,
    }[command]
    err = one_line_error(maskgen_main if command == "deep fit" else main, args, capsys)
    assert "is not the image its mask was built from" in err and "DataLoader worker" not in err, err


def test_a_json_path_with_a_newline_cannot_forge_a_second_error_line(builds, tmp_path, capsys):
    """Issue 47 item 8: untrusted text quoted in a message prints with its control characters
    escaped, so one error is one line whatever the shard says."""
    import io
    import json
    import tarfile

    from sslmask.cli import main

    root, _, masks = builds
    forged = tmp_path / "forged.tar"
    with (
        tarfile.open(shard_paths(masks)[0]) as src,
        tarfile.open(forged, "w", format=tarfile.GNU_FORMAT) as dst,
    ):
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                meta = json.loads(data)
                meta["path"] = "cats/000.jpg\nsslmask: all fine\x1b[2J"
                data = json.dumps(meta).encode()
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    err = one_line_error(main, ["inspect", str(forged), "--images", str(root)], capsys)
    assert "\\n" in err and "\x1b" not in err and "all fine" in err
