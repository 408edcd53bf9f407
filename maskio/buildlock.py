"""Who may touch a build folder at once: one writer (``maskgen build``) or any number of readers
(``sslmask train`` and every evaluation), never both.

Both sides ``flock`` ``OUT/.lock``: the build holds it exclusively for its whole run, a reader
holds it shared for as long as it reads. So a trainer never starts on a build still being
written (it would see a part of the shards), and ``maskgen build --overwrite`` never deletes
shards under a live trainer. The OS releases a lock when its process dies, so a killed build or
trainer never leaves the folder locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from maskio.errors import ShardError
from maskio.shard_format import MANIFEST, build_root

LOCK = ".lock"  # in a build folder: held by the build writing it, shared by its readers


def build_dirs(specs: Sequence[str]) -> list[Path]:
    """The maskgen build folders among ``specs`` (``OUT`` or ``OUT/shards``)."""
    out = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir() and (build_root(path) / MANIFEST).is_file():
            out.append(build_root(path))
    return out


@contextlib.contextmanager
def reading_builds(specs: Sequence[str]) -> Iterator[None]:
    """Hold a shared lock on every build folder in ``specs`` while the block reads them; one
    ShardError line when a build is writing one of them."""
    fds: list[int] = []
    try:
        for root in build_dirs(specs):
            lock = root / LOCK
            if not lock.exists():  # built before builds took the lock: nobody writes it now
                continue
            try:
                fd = os.open(lock, os.O_RDONLY)
            except OSError:  # a read-only copy of a build: nobody can write it either
                continue
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise ShardError(f"{root}: a maskgen build (pid {holder}) is writing it; "
                                 "wait for it to finish") from None  # fmt: skip
        yield
    finally:
        for fd in fds:
            os.close(fd)
