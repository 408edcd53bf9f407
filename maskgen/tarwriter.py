"""A WebDataset tar writer that writes each sample's files in the contract's order.

Why not ``webdataset.TarWriter``: it writes a sample's files sorted by extension (``cls``,
``jpg``, ``json``, ``mask.png``), and the shard format puts the image first and the json last
(``FIELD_ORDER``), so a streaming reader has the pixels before the metadata. Its ``mtime=``,
``user=`` and ``mode=`` would give fixed headers too; here every header has a fixed mtime,
owner and mode, so the same samples always give the same bytes: a retried or resumed shard is
byte-identical to the first attempt.
"""

from __future__ import annotations

import hashlib
import tarfile
from typing import IO

from maskio.shard_format import FIELD_ORDER, TAR_MTIME


class DeterministicTarWriter:
    def __init__(self, fileobj: IO[bytes]):
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115 -- closed by close()
        self.nsamples = 0

    def write_sample(self, key: str, fields: dict[str, bytes]) -> None:
        """Write one sample; fields are emitted in the contract's order."""
        if "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: keys contain no dots or slashes")
        unknown = set(fields) - set(FIELD_ORDER)
        if unknown:
            raise ValueError(f"unknown sample fields {sorted(unknown)}")
        for ext in FIELD_ORDER:
            if ext in fields:
                self._add(f"{key}.{ext}", fields[ext])
        self.nsamples += 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, _BytesReader(data))

    def close(self) -> None:
        self._tar.close()


class _BytesReader:
    """Minimal file-like over bytes for tarfile.addfile (avoids a BytesIO copy)."""

    def __init__(self, data: bytes):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        out = self._view[self._pos : end].tobytes()
        self._pos = end
        return out


def file_md5(path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
