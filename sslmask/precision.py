"""Which precision a training run computes in, and why (``train.amp``).

One code path for every device: the step runs under ``torch.autocast(device, dtype)``, losses
and running statistics are cast to float32 inside the methods, and a GradScaler is enabled only
for fp16 (which needs CUDA). ``auto`` resolves per machine: bf16 on a CUDA GPU that has it
(fp16 with the scaler on older GPUs), bf16 on a CPU with AMX tiles (Intel Sapphire Rapids and
later: measured 1.5-1.8x faster per ResNet-18 step, 2.0-2.3x with channels_last, 1.1-1.3x for
the tiny CPU-config networks; docs/results.md "Training steps by precision on CPU"), float32
on other CPUs, whose bf16 runs emulated or on AVX512-BF16 dot products only and has not been
measured faster here. The resolved precision is recorded in the run's checkpoint, so a resumed run keeps
the precision it started with on whatever machine it resumes.
"""

from __future__ import annotations

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class PrecisionError(ValueError):
    """``train.amp`` asks for a precision this device cannot train in."""


def cpu_capabilities() -> dict[str, bool]:
    """What torch's own CPU checks report (False where this torch has no such check)."""
    checks = {"amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return {name: bool(getattr(torch.cpu, fn, lambda: False)()) for name, fn in checks.items()}


def resolve_amp(requested: str, device: torch.device) -> str:
    """``bf16``, ``fp16`` or ``none``: what ``train.amp=requested`` means on ``device``."""
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested == "fp16":
        raise PrecisionError(
            f"train.amp=fp16 needs CUDA (fp16 trains with a GradScaler on GPUs); on {device.type} use bf16 or none"
        )
    if requested == "auto":
        return "bf16" if cpu_capabilities()["amx"] else "none"
    return requested


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None: float32)."""
    return AMP_DTYPES[amp]
