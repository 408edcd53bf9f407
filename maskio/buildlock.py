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
from maskio.shard_format import MANIFEST, SHARDS_DIR, build_root

LOCK = ".lock"  # in a build folder: held by the build writing it, shared by its readers


def build_dirs(specs: Sequence[str]) -> list[Path]:
    """The maskgen build folders ``specs`` read: ``OUT``, ``OUT/shards``, or shard files and
    patterns inside ``OUT/shards`` (a trainer given ``OUT/shards/*.tar`` reads the build too)."""
    out: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            root = build_root(path)
        elif path.parent.name == SHARDS_DIR:  # a shard, a glob or a brace pattern of shards
            root = path.parent.parent
        else:
            continue
        if (root / MANIFEST).is_file() and root not in out:
            out.append(root)
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


def shared_holders(lock: Path) -> list[int]:
    """PIDs holding a shared ``flock`` on ``lock``, from Linux's ``/proc/locks`` (empty
    elsewhere, or when it cannot be read): so a refused rebuild can name its readers."""
    try:
        inode = os.stat(lock).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:  # "1: FLOCK  ADVISORY  READ 1234 08:01:5678 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[3] == "READ":
            try:
                if int(fields[5].rsplit(":", 1)[-1]) == inode:
                    pids.append(int(fields[4]))
            except ValueError:
                continue
    return sorted(set(pids))
