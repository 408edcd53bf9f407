"""BYOL and HARL keep their numbers: the weights after a fixed number of deterministic CPU steps
on a fixed little shard are pinned (per tensor: shape, sum, sum of squares).

A change to the engine, the views or a method that is meant to leave them alone must pass
this. The steps run in a child process with one thread and the CPU kernels held to one
instruction set (aten's default kernels, oneDNN at SSE4.1, MKL's compatible mode): the last
bits of a convolution otherwise depend on which CPU the test lands on (AVX2 vs AVX-512/AMX). To re-record after a change that is *meant* to move them, run this file as a script
and say why in the commit: ``python tests/test_sslmask_pinned.py``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pinned_weights.json"
STEPS_ARGS = ["--config", "cpu-demo", "--set", "data.image_size=32", "--set", "data.batch_size=4",
              "--set", "data.workers=0", "--set", "model.proj_hidden=32", "--set", "model.pred_hidden=32",
              "--set", "model.proj_dim=16", "--set", "train.epochs=2", "--set", "train.deterministic=true",
              "--set", "train.log_every=1", "--set", "train.seed=7"]  # fmt: skip


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, n: int = 12) -> Path:
    """``n`` 40x48 scenes (a bright ellipse on a textured background, lossless PNG) with masks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(n):
            cy, cx, ry, rx = rng.uniform(12, 28), rng.uniform(14, 34), rng.uniform(6, 12), rng.uniform(6, 14)
            fg = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
            image = rng.integers(0, 120, (40, 48, 3)).astype(np.uint8)
            image[fg] = (rng.uniform(120, 255, 3) + rng.integers(-20, 20, (int(fg.sum()), 3))).clip(0, 255)
            fields = {
                "png": _png(image),
                "mask.png": _png(fg.astype(np.uint8) * 255),
                "cls": str(i % 3).encode(),
            }
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


PORTABLE_CPU = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip


# HARL is pinned with the mask-guided re-crop on (its default before issue 41), so the pin covers
# the re-crop and the mask-reading path as well as the loss; BYOL's pin covers plain crops
PINNED_SETS = {"byol": [], "harl": ["--set", "data.min_fg=0.2"]}


def fingerprint(method: str, workdir: Path) -> dict[str, list[float]]:
    """Train ``method`` for 2 epochs of 3 steps in a child process on portable CPU kernels; per
    tensor of its state: shape, sum, sum of squares."""
    shard = write_shard(workdir / "pinned.tar")
    run = workdir / method
    res = subprocess.run([sys.executable, "-m", "sslmask.cli", "train", str(shard), "--method", method,
                          "--out", str(run), *STEPS_ARGS, *PINNED_SETS[method]], env={**os.environ, **PORTABLE_CPU},
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    state = torch.load(run / "checkpoint.pt", weights_only=True)["method"]
    return {
        k: [*v.shape, float(v.double().sum()), float(v.double().pow(2).sum())]
        for k, v in sorted(state.items())
        if v.is_floating_point()
    }


@pytest.mark.parametrize("method", ["byol", "harl"])
def test_weights_after_fixed_deterministic_steps_are_pinned(method, tmp_path):
    pinned = json.loads(FIXTURE.read_text())[method]
    got = fingerprint(method, tmp_path)
    assert got.keys() == pinned.keys()
    for k in got:
        np.testing.assert_allclose(got[k], pinned[k], rtol=1e-5, atol=1e-6, err_msg=f"{method}: {k}")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = {m: fingerprint(m, Path(tmp)) for m in ("byol", "harl")}
    FIXTURE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"recorded {FIXTURE}", file=sys.stderr)
