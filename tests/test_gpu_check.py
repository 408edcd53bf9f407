"""benchmarks/gpu_check.py --dry-run: the GPU check's code paths, on CPU at a tiny size, so a
typo never wastes the minutes a GPU machine is lent for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_dry_run_runs_every_check_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu-check.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out),
                          "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["environment"]["device"] == "cpu"
    assert [b["decode"] for b in result["builds"]] == ["device", "pil"]
    for b in result["builds"]:  # every sample says where it ran
        assert b["ok"] and b["recorded_devices"] == {"cpu": 24} and b["images_per_second"] > 0
    assert result["train_steps"]["harl_images_per_second"] > 0
    assert result["train_steps"]["segas_over_mocov2_step_time"] > 0
    assert (
        result["vit_steps"]["dino_images_per_second"] > 0
        and result["vit_steps"]["mocov3_images_per_second"] > 0
        and result["vit_steps"]["scfs_images_per_second"] > 0
        and result["vit_steps"]["scfs_over_dino_step_time"] > 0
    )
    assert all(result["precisions"][m]["images_per_second"] > 0 for m in ("fp32", "bf16", "fp16"))
    kill = result["kill_resume"]
    assert 0 < kill["killed_at_step"] < kill["steps"] <= kill["final_step"]
    table = res.stdout.splitlines()
    assert table[0].startswith("GPU check on CPU (dry run)") and len(table) == 19


def test_gpu_check_refuses_to_run_the_real_check_without_a_gpu(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here; use --dry-run to check the code on CPU"
    ]
