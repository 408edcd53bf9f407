"""benchmarks/machine.py: every speed figure names its CPU, flags and kernels (issues 43, 46)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import machine  # noqa: E402 -- a benchmark helper, found through sys.path


def test_describe_names_the_cpu_its_flags_and_torchs_capability(monkeypatch):
    monkeypatch.setattr(machine, "cpu_model", lambda: "Test CPU 9000")
    monkeypatch.setattr(machine, "cpu_flags", lambda: ["avx2", "amx_bf16"])
    text = machine.describe()
    assert text.startswith("Test CPU 9000 (") and "flags avx2 amx_bf16" in text and "CPU capability" in text


def test_flags_are_read_from_cpuinfo_and_kernels_name_numba_and_opencv():
    info = Path("/proc/cpuinfo")
    if info.is_file():
        have = set(
            next(ln for ln in info.read_text().splitlines() if ln.startswith("flags")).split(":")[1].split()
        )
        assert machine.cpu_flags() == [f for f in machine.FLAGS if f in have]
    kernels = machine.drfi_kernels()
    assert "numba" in kernels and "OpenCV" in kernels and "numpy" in kernels
