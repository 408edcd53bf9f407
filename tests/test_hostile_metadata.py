"""Hostile inputs, third round (issue 44 items 3-7): doctored build metadata, nesting in every
carrier, billion-laughs YAML, corrupted resume state and a tar member with a huge declared
size. Each is one stderr line, a non-zero exit, no traceback, and nothing written or lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_hostile import deep_fit_args, one_line_failure

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
    random = ["--backbone", "random", "--arch", "resnet_tiny"]
    knn = ["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny", "--workers", "0"]
    train = ["train", str(build), "--method", "byol", "--config", "cpu-demo", "--out", str(tmp_path / "run")]
    return {
        "maskgen eval": (maskgen_main, ["eval", str(build)]),
        "publish --dry-run": (maskgen_main, ["publish", str(build), "--repo", "me/x", "--dry-run"]),
        "sslmask inspect": (sslmask_main, ["inspect", str(build)]),
        "sslmask train": (sslmask_main, train),
        "eval knn": (sslmask_main, [*knn, "--train", str(build), "--val", str(build)]),
        "deep fit": (
            maskgen_main,
            ["deep", "fit", "--shards", str(build), *random, "--out", str(tmp_path / "h.safetensors")],
        ),
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


# ---- item 4: nesting in every carrier; item 5: billion laughs ---------------------------------

BUILD_ONE = ["build", "--source", "sample", "--sample-size", "2", "--no-photos", "--executor", "local",
             "--no-progress"]  # fmt: skip


def test_a_deep_head_with_nested_metadata_is_one_line(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    shipped = next(
        (Path(__file__).resolve().parents[1] / "maskgen" / "methods" / "deep").glob("*.safetensors")
    )
    with safe_open(str(shipped), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "h.safetensors"), {**meta, "decoder": DEEP})
    rc = maskgen_main([*BUILD_ONE, "--method", "deep", "--head", str(tmp_path / "h.safetensors"),
                       "--out", str(tmp_path / "out")])  # fmt: skip
    one_line_failure(capsys, rc, "h.safetensors", "nested more than")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_drfi_model_with_nested_info_is_one_line(tmp_path, capsys):
    import numpy as np

    shipped = next((Path(__file__).resolve().parents[1] / "maskgen" / "methods" / "drfi").glob("*.npz"))
    arrays = dict(np.load(shipped))
    arrays["info"] = np.array(DEEP)
    np.savez(tmp_path / "m.npz", **arrays)
    rc = maskgen_main([*BUILD_ONE, "--method", "drfi", "--param", f"model={tmp_path / 'm.npz'}",
                       "--out", str(tmp_path / "out")])  # fmt: skip
    one_line_failure(capsys, rc, "m.npz", "nested more than")


def billion_laughs() -> str:
    text = "vars:\n  a: &a [" + ", ".join(['"lol"'] * 9) + "]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"  {name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text + "stages:\n  - {name: x, run: 'maskgen --help', outputs: [x]}\n"


def test_a_billion_laughs_recipe_is_refused_in_well_under_a_second(tmp_path, capsys):
    import time

    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    started = time.perf_counter()
    rc = maskgen_main(["pipeline", str(tmp_path / "bomb.yaml"), "--dry-run"])
    assert time.perf_counter() - started < 1.0
    one_line_failure(capsys, rc, "bomb.yaml", "expands to more than")


@pytest.mark.parametrize("kind", ["recipe", "config"])
def test_yaml_nested_twenty_thousand_deep_is_one_line(tmp_path, capsys, sample_build, kind):
    deep = "[" * 20_000 + "]" * 20_000
    if kind == "recipe":
        (tmp_path / "r.yaml").write_text(f"vars:\n  x: {deep}\nstages: []\n")
        one_line_failure(
            capsys, maskgen_main(["pipeline", str(tmp_path / "r.yaml"), "--dry-run"]), "nested more than"
        )
    else:
        (tmp_path / "c.yaml").write_text(f"train:\n  epochs: {deep}\n")
        rc = sslmask_main(["train", str(sample_build), "--method", "byol", "--config", str(tmp_path / "c.yaml"),
                           "--out", str(tmp_path / "run")])  # fmt: skip
        one_line_failure(capsys, rc, "c.yaml", "nested more than")
        assert not (tmp_path / "run").exists()


def test_yaml_aliases_within_bounds_still_load():
    from maskio.safeload import safe_yaml

    assert safe_yaml("base: &b {lr: 0.1}\nrun: *b\n") == {"base": {"lr": 0.1}, "run": {"lr": 0.1}}


# ---- item 6: corrupted resume state ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, sample_build) -> Path:
    from conftest import tiny_train_args

    run = tmp_path_factory.mktemp("resume") / "run"
    assert sslmask_main(tiny_train_args("byol", sample_build, run, "train.epochs=1")) == 0
    return run


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("step", -3, "step is -3"),
        ("step", "12", "step is '12'"),
        ("step", True, "step is True"),
        ("step", 10**30, "step is 1000000000"),
        ("config", "method: byol", "config is 'method: byol'"),
        ("method", [1, 2], "method is list"),
        ("rng", {"torch": "x"}, "rng is dict"),
        ("eval_branch", 7, "eval_branch is 7"),
    ],
)
def test_a_corrupted_resume_state_is_one_line(
    finished_run, tmp_path, capsys, sample_build, field, value, needle
):
    import torch
    from conftest import tiny_train_args

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt[field] = value
    torch.save(ckpt, run / "checkpoint.pt")
    before = (run / "checkpoint.pt").read_bytes()
    rc = sslmask_main([*tiny_train_args("byol", sample_build, run, "train.epochs=1"), "--resume", "auto"])
    one_line_failure(capsys, rc, "checkpoint.pt", "corrupt resume state", needle)
    assert (run / "checkpoint.pt").read_bytes() == before


# ---- item 7: a tar member with a huge declared size -----------------------------------------


def test_a_member_declaring_a_huge_size_is_refused_from_its_header(tmp_path, capsys):
    import io
    import tarfile

    path = tmp_path / "huge.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        data = b"{}"
        info = tarfile.TarInfo("s0.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw = bytearray(path.read_bytes())
    raw[124:136] = b"%011o\0" % 2**32  # the header's size field: 4 GiB (11 octal digits)
    raw[148:156] = b"        "
    raw[148:155] = b"%06o\0" % sum(raw[:512])  # the header checksum, recomputed
    path.write_bytes(bytes(raw))
    one_line_failure(capsys, sslmask_main(["inspect", str(path)]), "huge.tar", "declares 4,294,967,296 bytes")


# ---- issue 47 item 1: --out never overwrites a build's, run's or dataset's own file ----------


@pytest.mark.parametrize(
    ("writer", "target"),
    [
        ("knn", "run/checkpoint.pt"),
        ("knn", "run/log.jsonl"),
        ("linear", "build/shards/maskgen-000000.tar"),
        ("retrieval", "build/report.json"),
        ("deep fit", "run/checkpoint.pt"),
        ("drfi fit", "build/manifest.json"),
        ("export", "build/shards/maskgen-000001.stats.json"),
    ],
)
def test_no_writer_overwrites_a_file_of_a_build_or_run(build, finished_run, tmp_path, capsys, writer, target):
    b, run = tmp_path / "build", tmp_path / "run"
    shutil.copytree(build, b)
    shutil.copytree(finished_run, run)
    path = tmp_path / target
    before = path.read_bytes()
    model = ["--checkpoint", "random", "--arch", "resnet_tiny", "--workers", "0", "--out", str(path)]
    main, args = {
        "knn": (sslmask_main, ["eval", "knn", *model, "--train", str(b), "--val", str(b)]),
        "linear": (sslmask_main, ["eval", "linear", *model, "--train", str(b), "--val", str(b)]),
        "retrieval": (sslmask_main, ["eval", "retrieval", *model, "--data", str(b)]),
        "deep fit": (
            maskgen_main,
            [
                "deep",
                "fit",
                "--shards",
                str(b),
                "--backbone",
                "random",
                "--arch",
                "resnet_tiny",
                "--out",
                str(path),
            ],
        ),  # fmt: skip
        "drfi fit": (
            maskgen_main,
            ["drfi", "fit", "--source", "sample", "--sample-size", "2", "--out", str(path)],
        ),
        "export": (sslmask_main, ["export", str(run), "--out", str(path)]),
    }[writer]
    one_line_failure(capsys, main(args), str(path), "is a file of the")
    assert path.read_bytes() == before


# ---- issue 47 item 6: ground-truth bombs outside maskgen build -------------------------------


def bomb_png(path: Path) -> Path:
    """A 30000 x 30000 black PNG: under 1 MB on disk, 900 M pixels when decoded."""
    import zlib

    width = height = 30_000
    raw = zlib.compress(b"".join(b"\x00" + bytes(width // 8) for _ in range(height)), 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])  # 1-bit grey
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    )
    return path


def test_a_ground_truth_bomb_is_one_line_in_eval_and_localisation(build, tmp_path, capsys):
    gt = tmp_path / "gt"
    for sample in ("scenes", "photos"):
        (gt / sample).mkdir(parents=True)
    from maskio.shard_format import FIELD_META, decode_meta, iter_tar_samples, shard_paths

    paths = [decode_meta(f[FIELD_META])["path"] for t in shard_paths(build) for _, f in iter_tar_samples(t)]
    target = gt / Path(paths[0]).with_suffix(".png")
    target.parent.mkdir(parents=True, exist_ok=True)
    bomb_png(target)
    one_line_failure(capsys, maskgen_main(["eval", str(build), "--gt", str(gt)]), str(target), "pixels")
    rc = sslmask_main(["eval", "localization", "--checkpoint", "random", "--arch", "resnet_tiny", "--val",
                       str(build), "--gt-masks", str(gt), "--agnostic", "--workers", "0", "--image-size", "32"])  # fmt: skip
    one_line_failure(capsys, rc, "pixels")


# ---- issue 47 item 3: exit 0 on input that is wrong ------------------------------------------


def test_wrong_inputs_that_exited_0_are_one_line(build, finished_run, sample_build, tmp_path, capsys):
    import torch
    from conftest import tiny_train_args

    model = ["--checkpoint", "random", "--arch", "resnet_tiny", "--workers", "0", "--image-size", "32"]
    assert (
        sslmask_main(["eval", "knn", *model, "--train", str(build), "--val", str(build), "--k", "1000"]) == 0
    )
    out = capsys.readouterr()  # a k past the bank is a clearly stated result: noted, and recorded
    assert "--k 1000 is more than the 9 samples" in out.err
    assert json.loads(out.out)["accuracy"]["k=1000"]["k_used"] == 9

    nan_run = tmp_path / "nan"
    shutil.copytree(finished_run, nan_run)
    ckpt = torch.load(nan_run / "checkpoint.pt", weights_only=True)
    key = next(k for k in ckpt["method"] if k.startswith("backbone.") and k.endswith("conv1.weight"))
    ckpt["method"][key][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, nan_run / "checkpoint.pt")
    model[1] = str(nan_run)
    rc = sslmask_main(["eval", "knn", *model[:2], "--workers", "0", "--image-size", "32", "--train", str(build),
                       "--val", str(build)])  # fmt: skip
    one_line_failure(capsys, rc, "conv1.weight holds non-finite values")

    rc = sslmask_main(
        tiny_train_args("byol", sample_build, tmp_path / "lr", "optim.lr=1e30", "train.epochs=2")
    )
    err = capsys.readouterr().err  # the progress bar precedes the error line
    lines = [line for line in err.splitlines() if "error" in line]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "steps were skipped (loss not finite)" in lines[0], lines[0]

    rc = maskgen_main(["deep", "fit", "--shards", str(build), "--backbone", "random", "--arch", "resnet_tiny",
                       "--out", str(tmp_path / "h.safetensors"), "--iou-weight", "nan"])  # fmt: skip
    one_line_failure(capsys, rc, "--iou-weight", "not a finite number")
    assert not (tmp_path / "h.safetensors").exists()


# ---- issue 47 item 7: arguments bounded before anything is allocated --------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**70)])
def test_out_of_range_seeds_are_one_line(build, sample_build, tmp_path, capsys, seed):
    rc = maskgen_main(["build", "--source", "sample", "--sample-size", "2", "--method", "center", "--seed", seed,
                       "--out", str(tmp_path / "b"), "--executor", "local"])  # fmt: skip
    one_line_failure(capsys, rc, "--seed")
    rc = sslmask_main(
        ["train", str(sample_build), "--method", "byol", "--out", str(tmp_path / "r"), "--seed", seed]
    )
    one_line_failure(capsys, rc, "--seed")
    assert not (tmp_path / "b").exists() and not (tmp_path / "r").exists()


def test_a_brace_pattern_of_a_hundred_million_shards_is_refused_quickly(build, capsys):
    import time

    started = time.perf_counter()
    rc = sslmask_main(["inspect", str(build / "shards" / "maskgen-{00000000..99999999}.tar")])
    one_line_failure(capsys, rc, "expands to more than 100,000 shard names")
    assert time.perf_counter() - started < 30


@pytest.mark.parametrize(
    "pattern",
    ["a-{000..999}.tar", "x{a,b{1..3}}y{1..2}", "plain.tar", "{a..e}{0..10..2}", "a{b,c}d{e,f,g}", "{5..1}"],
)
def test_brace_count_is_the_length_of_the_expansion(pattern):
    import braceexpand

    from maskio.records import brace_count

    assert brace_count(pattern) == len(list(braceexpand.braceexpand(pattern)))


@pytest.mark.parametrize(("address", "needle"), [("not-an-address", "expected HOST:PORT"),
                                                 ("127.0.0.1:1", "nothing answers there")])  # fmt: skip
def test_a_bad_or_dead_ray_address_is_one_line_in_seconds(tmp_path, capsys, address, needle):
    """Issue 47 items 4 and 7: Ray retried a dead address for 120 s+ printing GCS time-outs."""
    import time

    started = time.perf_counter()
    rc = maskgen_main(["build", "--source", "sample", "--sample-size", "2", "--method", "center", "--out",
                       str(tmp_path / "b"), "--ray-address", address, "--no-progress"])  # fmt: skip
    one_line_failure(capsys, rc, "--ray-address", needle)
    assert time.perf_counter() - started < 20
    assert not (tmp_path / "b").exists()  # refused before anything was written
    dry = maskgen_main(["build", "--source", "sample", "--sample-size", "2", "--method", "center", "--out",
                        str(tmp_path / "b"), "--ray-address", address, "--dry-run"])  # fmt: skip
    assert dry == (
        0 if address == "127.0.0.1:1" else 1
    )  # a plan asks no network; the syntax is still checked


@pytest.mark.parametrize("data", [b"[1, 2]", b"{not json", b'"a string"', b"[" * 5000 + b"]" * 5000,
                                  b'{"label": "abc"}', b'{"path": 7}'])  # fmt: skip
@pytest.mark.parametrize("command", ["train", "knn", "deep fit"])
def test_a_malformed_sample_json_is_refused_by_every_reader(sample_build, tmp_path, capsys, data, command):
    """Issue 47 item 3: train, the evals and deep fit accepted a malformed KEY.json (exit 0)
    that inspect and maskgen eval refused; the index now reads and checks every sample's json."""
    from conftest import tiny_train_args
    from test_hostile import build_with_member

    build, shard, key = build_with_member(tmp_path, sample_build, ".json", data)
    main, args = {
        "train": (sslmask_main, tiny_train_args("byol", build, tmp_path / "r")),
        "knn": (
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
        "deep fit": (maskgen_main, deep_fit_args(build, tmp_path / "h.safetensors")),
    }[command]
    one_line_failure(capsys, main(args), str(shard), f"sample {key}", "json")
