"""Crash-safe file writes: a partial file never carries its final name.

The one way this project writes a file that someone may read while it is being written, or
after a crash: shards, stats, manifests, reports, checkpoints, heads, indexes and recipe
records all go through :func:`atomic_open`. Files get the process's umask, like any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


def temp_path_for(final: Path) -> Path:
    """A hidden, unique sibling of ``final``: same filesystem (atomic rename), never globbed."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem supports directory fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(final: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write to a temporary sibling, fsync, then rename onto ``final``; remove it on error."""
    final = Path(final)
    tmp = temp_path_for(final)
    f = open(tmp, mode)  # noqa: SIM115 -- closed on every path below
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            f.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, f"{exc.strerror} (writing)", str(final)) from None  # name the file
        raise


def write_json(final: str | os.PathLike, obj: Any) -> None:
    with atomic_open(final, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def _writer_alive(name: str) -> bool:
    """Whether the process that named this temporary (``...tmp-PID-xxxx``) still runs here."""
    try:
        pid = int(name.rsplit(TMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> int:
    """Delete temporaries left by killed writers: those whose process no longer runs on this
    machine (a live writer's temp is kept, so a concurrent writer is never robbed)."""
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and TMP_MARK in p.name and not _writer_alive(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
    return n
