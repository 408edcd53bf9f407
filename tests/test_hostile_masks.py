"""Shards that break their contract (issue 47 item 3): an RGB, 16-bit, palette or grey-valued
``mask.png``, or one of another size than its image, is one stderr line naming the shard, the
sample and the mask in every reader, never a silently re-binarised mask; a sample or member
that appears twice is refused; a build whose shard was swapped is not re-scored; a build of
nothing fails, and masks replaced by the centre prior are said."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_hostile import build_with_member, deep_fit_args, one_line_failure

from maskgen.cli import main as maskgen_main
from maskio.errors import ShardFormatError
from maskio.shard_format import FIELD_META, decode_mask_png, iter_tar_samples, mask_levels
from sslmask.cli import main as sslmask_main


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buf, format="PNG")
    return buf.getvalue()


def _box(h: int, w: int, value: int = 255) -> np.ndarray:
    a = np.zeros((h, w), np.uint8)
    a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = value
    return a


BAD_MASKS = {
    "rgb": (lambda h, w: _png(np.stack([_box(h, w)] * 3, axis=-1)), "mode RGB"),
    "16-bit": (lambda h, w: _png(_box(h, w).astype(np.uint16) * 257), "mode I;16"),
    "palette": (lambda h, w: _png(_box(h, w), "P"), "mode P"),
    "grey levels": (lambda h, w: _png(_box(h, w, 128)), "values must be 0 or 255, found 128"),
    "wrong size": (lambda h, w: _png(_box(h + 3, w)), "its image"),
}


def test_the_contracts_mask_decodes_and_every_other_kind_is_refused():
    good = _box(8, 10)
    np.testing.assert_array_equal(decode_mask_png(_png(good)), good > 0)
    for kind, (make, needle) in BAD_MASKS.items():
        if kind == "wrong size":
            continue
        with pytest.raises(ShardFormatError, match=needle):
            mask_levels(make(8, 10))


def _readers(build, tmp_path) -> dict[str, tuple]:
    random = ["--checkpoint", "random", "--arch", "resnet_tiny", "--workers", "0"]
    tiny = ["--set", "data.workers=0", "--set", "data.batch_size=4", "--set", "data.image_size=32"]
    return {
        "sslmask inspect": (sslmask_main, ["inspect", str(build)]),
        "sslmask train harl": (
            sslmask_main,
            [
                "train",
                str(build),
                "--method",
                "harl",
                "--config",
                "cpu-demo",
                "--out",
                str(tmp_path / "run"),
                *tiny,
            ],
        ),
        "eval occlusion": (
            sslmask_main,
            ["eval", "occlusion", *random, "--train", str(build), "--val", str(build), "--image-size", "32"],
        ),
        "maskgen eval": (maskgen_main, ["eval", str(build)]),
        "deep fit": (maskgen_main, deep_fit_args(build, tmp_path / "h.safetensors")),
    }


@pytest.mark.parametrize("kind", list(BAD_MASKS))
@pytest.mark.parametrize("reader", list(_readers(Path("."), Path("."))))
def test_a_mask_off_the_contract_is_one_line_in_every_reader(sample_build, tmp_path, capsys, kind, reader):
    _, fields = next(iter_tar_samples(sample_build / "shards" / "maskgen-000000.tar"))
    meta = json.loads(fields[FIELD_META])
    make, needle = BAD_MASKS[kind]
    build, shard, key = build_with_member(
        tmp_path, sample_build, ".mask.png", make(meta["height"], meta["width"])
    )
    main, args = _readers(build, tmp_path)[reader]
    rc = main(args)
    if reader.startswith(
        "sslmask train"
    ):  # training meets the sample after a few steps: its progress bar came first
        err = capsys.readouterr().err
        assert rc != 0 and "Traceback" not in err, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("sslmask: error: ") and key in line and needle in line, line
    else:
        line = one_line_failure(capsys, rc, key, needle)
    assert "mask" in line
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.parametrize("swap", ["empty tar", "truncated"])
def test_eval_of_a_build_whose_shard_was_swapped_refuses_and_keeps_the_report(
    sample_build, tmp_path, capsys, swap
):
    """Issue 47: an empty tar in a shard's place made ``maskgen eval`` rewrite report.json with
    mIoU null; the shard's stats (size, sample count) now say it is not the build's."""
    import shutil
    import tarfile

    build = tmp_path / "b"
    shutil.copytree(sample_build, build)
    shard = build / "shards" / "maskgen-000001.tar"
    if swap == "empty tar":
        tarfile.open(shard, "w").close()
    else:
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = (build / "report.json").read_bytes()
    one_line_failure(capsys, maskgen_main(["eval", str(build)]), str(shard), "replaced after the build")
    assert (build / "report.json").read_bytes() == report


def test_all_black_ground_truth_is_said_loudly_and_a_build_of_nothing_fails(tmp_path, capsys):
    """Issue 47: ``--method gt`` with all-black masks gave centre-prior masks for every image
    without a word, and ``--max-pixels 1`` built 0 images with exit 0."""
    root, gt = tmp_path / "img", tmp_path / "gt"
    root.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / f"{i}.png")
        Image.fromarray(np.zeros((40, 60), np.uint8)).save(gt / f"{i}.png")
    common = ["build", "--source", "folder", "--root", str(root), "--executor", "local", "--no-progress"]
    assert maskgen_main([*common, "--gt", str(gt), "--method", "gt", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert (
        "warning: 3 of 3 masks were empty or full and replaced by the centre prior (3 fallback:empty" in err
    )
    rc = maskgen_main([*common, "--method", "center", "--max-pixels", "1", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "every one of the 3 images was skipped" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.parametrize(
    "names",
    [["s0.jpg", "s0.json", "s1.jpg", "s0.mask.png"], ["s0.jpg", "s0.mask.png", "s0.mask.png"]],
    ids=["key comes back", "member twice"],
)
def test_a_sample_or_member_twice_in_a_shard_is_refused_by_both_readers(tmp_path, names):
    """Issue 47: localisation counted 9 of 8 images on a tar with a duplicate member."""
    from test_hostile import shard_bytes

    from maskio.shard_format import index_tar

    path = tmp_path / "dup.tar"
    path.write_bytes(shard_bytes([(n, b"x") for n in names]))
    with pytest.raises(ShardFormatError, match="appears twice"):
        list(iter_tar_samples(path))
    with pytest.raises(ShardFormatError, match="appears twice"):
        index_tar(path)
