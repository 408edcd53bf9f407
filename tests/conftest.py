"""Shared fixtures: paths to ../shared/data, tiny image files of every awkward kind."""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MASKGEN_SHARED_DATA", ROOT.parent / "shared" / "data"))


def shared(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not available")
    return path


def maskgen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "maskgen.cli", *args]


def jpeg_bytes(arr: np.ndarray, **save_kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **save_kw)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def exif_rotated_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels are ``arr`` and whose EXIF asks viewers to rotate it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(arr, exif=exif.tobytes())


def png_with_forged_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's signature)."""
    data = png_bytes(Image.new("L", (1, 1)))
    ihdr_start = 8 + 8  # signature, then length + type of the IHDR chunk
    body = bytearray(data[ihdr_start : ihdr_start + 13])
    body[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF)
    return data[:ihdr_start] + bytes(body) + crc + data[ihdr_start + 17 :]


def gradient_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], axis=2)
    return np.clip(img + rng.integers(0, 20, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def sample_build(tmp_path_factory) -> Path:
    """One small sample build (in-process executor), shared by read-only tests."""
    from maskgen.cli import main

    out = tmp_path_factory.mktemp("sample_build") / "out"
    rc = main(["build", "--source", "sample", "--sample-size", "30", "--shard-size", "16",
               "--method", "center", "--out", str(out), "--executor", "local", "--no-progress",
               "--save-saliency"])  # fmt: skip
    assert rc == 0
    return out


def refused_train(method: str, build: Path, out: Path, sets: list[str], capsys) -> str:
    """Run ``sslmask train`` with ``--set``s that must be refused; its one stderr line."""
    from sslmask.cli import main

    args = ["train", str(build), "--method", method, "--config", "cpu-demo", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def tiny_train_args(method: str, build: Path, run: Path, *sets: str) -> list[str]:
    """``sslmask train`` arguments for a few seconds of ``method`` on a test build."""
    tiny = ["data.image_size=48", "data.batch_size=8", "data.workers=0", "model.proj_hidden=32",
            "model.pred_hidden=32", "model.proj_dim=16", "train.log_every=1", *sets]  # fmt: skip
    args = ["train", str(build), "--method", method, "--out", str(run), "--config", "cpu-demo"]
    for item in tiny:
        args += ["--set", item]
    return args
