"""sslmask reads maskgen shards through the contract module only."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from maskio.errors import ShardError
from maskio.records import resolve_shards
from sslmask.cli import main
from sslmask.data import iter_samples, summarize


def test_resolve_build_folder_glob_and_braces(sample_build):
    shards = sample_build / "shards"
    expected = [str(shards / f"maskgen-00000{i}.tar") for i in range(3)]
    assert resolve_shards([str(sample_build)]) == expected
    assert resolve_shards([str(shards)]) == expected
    assert resolve_shards([str(shards / "*.tar")]) == expected
    assert resolve_shards([str(shards / "maskgen-{000000..000002}.tar")]) == expected


def test_missing_or_empty_shard_paths_are_errors(tmp_path):
    with pytest.raises(ShardError, match="no such shard"):
        resolve_shards([str(tmp_path / "nope-{0..3}.tar")])
    with pytest.raises(ShardError, match="no complete maskgen shards"):
        resolve_shards([str(tmp_path)])


def test_samples_decode_aligned(sample_build):
    samples = list(iter_samples(resolve_shards([str(sample_build)])))
    assert len(samples) == 42
    for s in samples:
        assert s.image.shape[:2] == s.mask.shape and s.mask.dtype == bool
        assert s.label == s.meta["label"]
        assert s.mask.mean() == pytest.approx(s.meta["fg_fraction"])


def test_inspect_cli(sample_build, capsys):
    assert main(["inspect", str(sample_build)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 42 and summary["classes"] == 6 and summary["images"]
    assert summary == summarize(resolve_shards([str(sample_build)]))
    assert main(["inspect", "/nonexistent/x.tar"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such shard" in err[0]


def test_masks_only_shards_are_refused_for_training(tmp_path):
    from maskgen.cli import main as maskgen_main

    out = tmp_path / "out"
    assert maskgen_main(["build", "--method", "center", "--out", str(out), "--sample-size", "3",
                         "--image-format", "none", "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    with pytest.raises(ShardError, match="has no image"):
        next(iter_samples(resolve_shards([str(out)])))
    assert not summarize(resolve_shards([str(out)]))["images"]


def test_sslmask_imports_only_the_shard_contract_from_maskgen():
    for path in Path(__file__).resolve().parents[1].joinpath("sslmask").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("maskgen"):
                assert node.module == "maskio.shard_format", f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("maskgen") or alias.name == "maskio.shard_format"
