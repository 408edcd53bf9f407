"""The machine a benchmark ran on, in one line: speed figures from two CPUs are told apart by it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (Linux), else what ``platform`` says."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide the fast kernels (bf16 autocast, numba, OpenCV)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return []
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in FLAGS if f in have]
    return []


def describe() -> str:
    """``CPU model (N cores usable; flags ...); torch X, CPU capability Y``."""
    text = f"{cpu_model()} ({len(os.sched_getaffinity(0))} cores usable; flags {' '.join(cpu_flags()) or 'none'})"
    try:
        import torch

        text += f"; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    except ImportError:
        pass
    return text


def drfi_kernels() -> str:
    """Which compiled kernels DRFI's timings come from: numba's target CPU (what LLVM compiled
    the loops for), OpenCV's baseline and dispatched SIMD, numpy's version."""
    parts = []
    try:
        import llvmlite.binding as llvm
        import numba

        parts.append(f"numba {numba.__version__} for {llvm.get_host_cpu_name()}")
    except ImportError:
        parts.append("numba absent (pure-numpy loops)")
    try:
        import cv2

        simd = {}
        for line in cv2.getBuildInformation().splitlines():
            key, _, value = line.strip().partition(":")
            if key in ("Baseline", "Dispatched code generation"):
                simd[key] = value.split()
        parts.append(f"OpenCV {cv2.__version__} (SIMD {' '.join(simd.get('Baseline', []))}, dispatched "
                     f"{' '.join(simd.get('Dispatched code generation', []))})")  # fmt: skip
    except ImportError:
        parts.append("OpenCV absent")
    import numpy

    parts.append(f"numpy {numpy.__version__}")
    return "; ".join(parts)


if __name__ == "__main__":
    print(describe())
    print(drfi_kernels())
