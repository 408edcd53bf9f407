"""Per-iteration schedules (computed from the step, never stored: resume needs only the step)."""

from __future__ import annotations

import math


def cosine_ramp(base: float, step: int, total: int) -> float:
    """``1 - (1 - base) (cos(pi k/K) + 1) / 2``: from ``base`` at k=0 up to 1 at k=K.

    BYOL's EMA rate tau and HARL's alpha/lambda schedules (docs/methods.md §0).
    """
    k = min(max(step, 0), total)
    return 1 - (1 - base) * (math.cos(math.pi * k / max(total, 1)) + 1) / 2


def cosine(base: float, final: float, step: int, total: int) -> float:
    """Cosine from ``base`` at step 0 to ``final`` at ``total`` (DINO's weight-decay schedule)."""
    k = min(max(step, 0), total)
    return final + (base - final) * (math.cos(math.pi * k / max(total, 1)) + 1) / 2


def linear_warmup(start: float, end: float, step: int, warmup: int) -> float:
    """Linear from ``start`` to ``end`` over ``warmup`` steps, then ``end`` (DINO's teacher temperature)."""
    if step >= warmup:
        return end
    return start + (end - start) * step / max(warmup, 1)


def warmup_cosine(base: float, step: int, total: int, warmup: int, final: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine from ``base`` to ``final``."""
    if step < warmup:
        return base * (step + 1) / warmup
    k = min(step - warmup, max(total - warmup, 1))
    span = max(total - warmup, 1)
    return final + (base - final) * (math.cos(math.pi * k / span) + 1) / 2
