"""Hostile inputs, third round (issue 44 items 3-7): doctored build metadata, nesting in every
carrier, billion-laughs YAML, corrupted resume state and a tar member with a huge declared
size. Each is one stderr line, a non-zero exit, no traceback, and nothing written or lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_hostile import one_line_failure

from maskgen.cli import main as maskgen_main
from sslmask.cli import main as sslmask_main

DEEP = "[" * 100_000 + "]" * 100_000
DOCTORED = {
    "nested": DEEP,
    "list": "[1, 2, 3]",
    "not json": "{not json",
    "class names": json.dumps({"complete": True, "n_shards": 3, "class_names": [1, 2]}),
    "n_shards": json.dumps({"complete": True, "n_shards": "three"}),
    "deep object": "{" + '"a":{' * 40 + "}" * 40 + "}",
}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "b"
    assert maskgen_main(["build", "--source", "sample", "--sample-size", "9", "--no-photos", "--method", "center",
                         "--out", str(out), "--shard-size", "3", "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    return out


def doctored_copy(build: Path, tmp_path: Path, name: str, text: str) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    (copy / name).write_text(text)
    return copy


def reader_commands(build: Path, tmp_path: Path) -> dict[str, tuple]:
    return {
        "maskgen eval": (maskgen_main, ["eval", str(build)]),
        "publish --dry-run": (maskgen_main, ["publish", str(build), "--repo", "me/x", "--dry-run"]),
        "sslmask inspect": (sslmask_main, ["inspect", str(build)]),
        "sslmask train": (
            sslmask_main,
            ["train", str(build), "--method", "byol", "--config", "cpu-demo", "--out", str(tmp_path / "run")],
        ),  # fmt: skip
        "eval knn": (
            sslmask_main,
            [
                "eval",
                "knn",
                "--checkpoint",
                "random",
                "--arch",
                "resnet_tiny",
                "--train",
                str(build),
                "--val",
                str(build),
                "--workers",
                "0",
            ],
        ),  # fmt: skip
        "deep fit": (
            maskgen_main,
            [
                "deep",
                "fit",
                "--shards",
                str(build),
                "--backbone",
                "random",
                "--arch",
                "resnet_tiny",
                "--out",
                str(tmp_path / "h.safetensors"),
            ],
        ),  # fmt: skip
    }


@pytest.mark.parametrize("doctored", list(DOCTORED))
@pytest.mark.parametrize("command", list(reader_commands(Path("."), Path("."))))
def test_a_doctored_manifest_is_one_line_in_every_reader(build, tmp_path, capsys, doctored, command):
    copy = doctored_copy(build, tmp_path, "manifest.json", DOCTORED[doctored])
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    main, args = reader_commands(copy, tmp_path)[command]
    line = one_line_failure(capsys, main(args), "manifest.json")
    assert "RecursionError" not in line and "AttributeError" not in line
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before  # nothing written
    assert not (tmp_path / "run").exists() and not (tmp_path / "h.safetensors").exists()


@pytest.mark.parametrize("doctored", ["nested", "list", "not json"])
def test_doctored_stats_and_report_are_one_line(build, tmp_path, capsys, doctored):
    copy = doctored_copy(build, tmp_path, "shards/maskgen-000001.stats.json", DOCTORED[doctored])
    one_line_failure(capsys, maskgen_main(["eval", str(copy)]), "maskgen-000001.stats.json")
    shutil.rmtree(copy)
    copy = doctored_copy(build, tmp_path, "report.json", DOCTORED[doctored])
    one_line_failure(
        capsys, maskgen_main(["publish", str(copy), "--repo", "me/x", "--dry-run"]), "report.json"
    )


@pytest.mark.parametrize("doctored", ["nested", "list", "class names"])
def test_a_doctored_published_snapshot_is_one_line(build, tmp_path, capsys, doctored):
    snapshot = tmp_path / "snap"
    (snapshot / "data" / "train").mkdir(parents=True)
    for tar in sorted((build / "shards").glob("*.tar")):
        shutil.copy(tar, snapshot / "data" / "train" / tar.name)
    (snapshot / "maskgen.json").write_text(DOCTORED[doctored])
    one_line_failure(capsys, sslmask_main(["inspect", str(snapshot)]), "maskgen.json")
