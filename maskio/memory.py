"""How much memory this machine has left: a size the user set that cannot fit is refused in
one line before anything is allocated (Linux overcommits, so a too-large allocation can be an
OOM kill instead of an exception)."""

from __future__ import annotations

from pathlib import Path

GIB = 2**30


def available_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (Linux), None where it is not known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(needed: int, what: str) -> None:
    """MemoryError naming ``what`` when ``needed`` bytes exceed what this machine has left."""
    have = available_bytes()
    if have is not None and needed > have:
        raise MemoryError(
            f"{what} needs about {needed / GIB:.1f} GiB; this machine has {have / GIB:.1f} GiB available"
        )
