"""maskio's small pieces: the one KEY=VALUE parser and the one crash-safe write."""

from __future__ import annotations

import errno
import io
import os

import pytest

from maskio import atomic
from maskio.errors import KeyValueError
from maskio.keyvalue import parse_pairs, parse_value, split_pair


@pytest.mark.parametrize(
    ("raw", "value"),
    [("300", 300), ("-1", -1), ("0.3", 0.3), ("1e-3", 1e-3), ("true", True), ("false", False),
     ("null", None), ("[0.2, 1.0]", [0.2, 1.0]), ('{"a": 1}', {"a": 1}), ("heuristic", "heuristic"),
     ("forest+rbd", "forest+rbd"), ("yes", "yes"), ("on", "on"), ("/tmp/x.npz", "/tmp/x.npz"),
     ("[not json", "[not json"), ("", "")],
)  # fmt: skip
def test_parse_value_types_numbers_words_and_json_and_keeps_the_rest(raw, value):
    assert parse_value(raw) == value and type(parse_value(raw)) is type(value)


def test_split_pair_and_parse_pairs():
    assert split_pair(" k =a=b", "--param") == ("k", "a=b")  # the first = splits
    assert parse_pairs(["k=3", "scorer=rbd", "k=4"], "--param") == {"k": 4, "scorer": "rbd"}
    assert parse_pairs(["n=3"], "--var", typed=False) == {"n": "3"}
    for bad in ("k", "=3", " =3"):
        with pytest.raises(KeyValueError, match=r"^--info '.*': expected KEY=VALUE$"):
            split_pair(bad, "--info")


def _temps(folder):
    return [p.name for p in folder.iterdir() if atomic.TMP_MARK in p.name]


def test_atomic_open_renames_only_a_complete_file(tmp_path):
    final = tmp_path / "a.json"
    atomic.write_json(final, {"x": 1})
    assert final.read_text() == '{\n  "x": 1\n}\n' and _temps(tmp_path) == []
    with pytest.raises(RuntimeError), atomic.atomic_open(final, "w") as f:
        f.write("partial")
        raise RuntimeError("crash mid-write")
    assert final.read_text() == '{\n  "x": 1\n}\n' and _temps(tmp_path) == []


def test_atomic_open_leaves_no_temp_when_the_disk_is_full(tmp_path, monkeypatch):
    """On a full disk the flush inside close() fails again; the temp must still go."""

    class FullDisk(io.FileIO):
        def write(self, data):  # buffered until close, which then fails like ENOSPC
            return len(data)

        def close(self):
            if not self.closed:
                super().close()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "open", lambda path, mode: FullDisk(path, "w"), raising=False)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "no space")))
    with pytest.raises(OSError, match="space"):
        atomic.write_json(tmp_path / "m.json", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_atomic_files_get_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_stale_temps_of_dead_writers_go_and_a_live_writers_stay(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        "live": f".a.tar{atomic.TMP_MARK}{os.getppid()}-0000aaaa",  # another running process
        "dead": f".b.tar{atomic.TMP_MARK}{dead.pid}-0000bbbb",
        "odd": f".c.tar{atomic.TMP_MARK}notapid",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert atomic.remove_stale_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [names["live"]]
