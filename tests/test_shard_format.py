"""The deterministic tar writer and the safe shard reader."""

from __future__ import annotations

import io
import tarfile

import pytest

from maskgen.tarwriter import DeterministicTarWriter
from maskio.shard_format import (
    ShardFormatError,
    iter_tar_samples,
    sanitize_key,
    shard_index_of,
    shard_name,
    stats_name,
)


def write(samples) -> bytes:
    buf = io.BytesIO()
    w = DeterministicTarWriter(buf)
    for key, fields in samples:
        w.write_sample(key, fields)
    w.close()
    return buf.getvalue()


def test_same_samples_same_bytes_and_contract_order(tmp_path):
    samples = [
        ("a", {"json": b"{}", "mask.png": b"m", "jpg": b"j", "cls": b"3"}),
        ("b", {"jpg": b"x", "json": b"{}"}),
    ]
    one, two = write(samples), write(samples)
    assert one == two
    with tarfile.open(fileobj=io.BytesIO(one)) as tar:
        names = tar.getnames()
        assert names == ["a.jpg", "a.mask.png", "a.cls", "a.json", "b.jpg", "b.json"]
        assert {m.mtime for m in tar} == {0} and {m.uid for m in tar} == {0}
    path = tmp_path / "s.tar"
    path.write_bytes(one)
    assert list(iter_tar_samples(path)) == [
        ("a", {"jpg": b"j", "mask.png": b"m", "cls": b"3", "json": b"{}"}),
        ("b", {"jpg": b"x", "json": b"{}"}),
    ]
    assert list(iter_tar_samples(path, {"json"}))[0] == ("a", {"json": b"{}"})


@pytest.mark.parametrize("key", ["a.b", "a/b"])
def test_bad_keys_are_refused(key):
    with pytest.raises(ValueError, match="invalid sample key"):
        write([(key, {"json": b"{}"})])


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd.json", "sub/dir.json"])
def test_reader_refuses_members_that_escape(tmp_path, name):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ShardFormatError):
        list(iter_tar_samples(path))


def test_reader_refuses_links(tmp_path):
    path = tmp_path / "link.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("a.json")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ShardFormatError, match="not a regular file"):
        list(iter_tar_samples(path))


def test_names_and_keys():
    assert shard_name(12) == "maskgen-000012.tar" and stats_name(3) == "maskgen-000003.stats.json"
    assert shard_index_of("maskgen-000012.tar") == 12 and shard_index_of("maskgen-000012.stats.json") == 12
    assert shard_index_of(".maskgen-000012.tar.tmp-1-ab") is None
    assert sanitize_key("n01440764/n01440764_10026") == "n01440764__n01440764_10026"
    assert sanitize_key("a b/c.d.e") == "a_b__c_d_e"
    assert "." not in sanitize_key("x.y/z..w")
