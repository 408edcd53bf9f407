"""A hostile user's inputs (issue #20): every refusal is one stderr line naming the option or the
shard, sample and field, with a non-zero exit and no traceback; nothing is left behind."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import jpeg_bytes, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from maskgen.cli import main as maskgen_main
from maskio.errors import ShardError
from maskio.records import index_shards
from sslmask.cli import main as sslmask_main
from sslmask.data import iter_samples, summarize


def one_line_failure(capsys, rc: int, *needles: str) -> str:
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert rc != 0, out.err
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


BUILD = [
    "build",
    "--source",
    "sample",
    "--sample-size",
    "2",
    "--no-photos",
    "--executor",
    "local",
    "--no-progress",
]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--method", "drfi", "--param", "levels=harl", "--param", "k=-1"], ["k=-1", "in (0, 1000000000]"]),
        (["--method", "drfi", "--param", "levels=harl", "--param", "k=0"], ["k=0", "in (0, 1000000000]"]),
        (["--method", "drfi", "--param", "levels=harl", "--param", "min_size=0"], ["min_size=0", "in [1, "]),
        (
            ["--method", "drfi", "--param", "levels=harl", "--param", "min_size=99999999999999999999999"],
            ["min_size=", "in [1, 89478485]"],
        ),  # issue 35: an OverflowError on every image, exit 0
        (
            ["--method", "drfi", "--param", "levels=harl", "--param", "k=1e300"],
            ["k=1e+300", "in (0, 1000000000]"],
        ),
        (["--method", "drfi", "--param", "levels=harl", "--param", "sigma=abc"], ["sigma=abc", "number"]),
        (["--method", "center", "--param", "nosuch=1"], ["nosuch", "no such parameter", "sigma"]),
        (["--method", "deep", "--param", "short_side=-5"], ["short_side=-5", ">= 16"]),
        (["--method", "center", "--sample-size", "0"], ["--sample-size", "0"]),
        (["--method", "center", "--max-pixels", "0"], ["--max-pixels"]),
        (["--method", "center", "--shard-size", "0"], ["--shard-size"]),
    ],
)
def test_build_refuses_nonsense_values(tmp_path, capsys, args, needles):
    out = tmp_path / "out"
    one_line_failure(capsys, maskgen_main([*BUILD, *args, "--out", str(out)]), *needles)
    assert not out.exists() or not any(out.rglob("*.tar"))


def test_build_into_an_impossible_folder_is_one_line(capsys):
    one_line_failure(
        capsys, maskgen_main([*BUILD, "--method", "center", "--out", "/dev/null/x"]), "/dev/null/x"
    )


@pytest.mark.parametrize("option", ["--epochs", "--batch-size"])
def test_deep_fit_refuses_zero(tmp_path, capsys, sample_build, option):
    rc = maskgen_main(
        ["deep", "fit", str(sample_build), "--out", str(tmp_path / "h.safetensors"), option, "0"]
    )
    one_line_failure(capsys, rc, option)
    assert not (tmp_path / "h.safetensors").exists()


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
        ("data.image_size=0", "data.image_size=0: must be in [16, 4096]"),
        ("train.epochs=0", "train.epochs=0: must be >= 1"),
        ("train.epochs=-1", "train.epochs=-1"),
        ("optim.lr=nan", "optim.lr=nan"),
        ("model.out_stride=8", "model.out_stride=8: must be one of 16, 32"),
        ("ema.tau_base=1.5", "ema.tau_base=1.5: must be in [0, 1]"),
        ("monitor.knn_holdout=1", "monitor.knn_holdout"),
        ("train.snapshot_epochs=[0]", "train.snapshot_epochs"),
        ("data.nosuch=1", "unknown config key 'data.nosuch'"),
        ("model.arch=resnet9", "resnet9"),
    ],
)
def test_train_refuses_bad_config_values(tmp_path, capsys, sample_build, setting, needle):
    run = tmp_path / "run"
    rc = sslmask_main(["train", str(sample_build), "--method", "harl", "--config", "cpu-demo", "--out", str(run),
                       "--set", setting])  # fmt: skip
    one_line_failure(capsys, rc, needle)
    assert not (run / "checkpoint.pt").exists()


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_basic_block_resnets_run_at_output_stride_16(arch):
    import torchvision

    from sslmask.backbones import build_backbone

    trunk = build_backbone(arch, out_stride=16)
    assert trunk(torch.zeros(1, 3, 64, 64)).shape[-2:] == (4, 4)
    missing = (
        getattr(torchvision.models, arch)().load_state_dict(trunk.state_dict(), strict=False).missing_keys
    )
    assert missing == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--k", "0"], "--k"), (["--batch-size", "0"], "--batch-size"), (["--image-size", "0"], "--image-size")],
)
def test_eval_refuses_nonsense_values(capsys, sample_build, args, option):
    rc = sslmask_main(["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny",
                       "--train", str(sample_build), "--val", str(sample_build), *args])  # fmt: skip
    one_line_failure(capsys, rc, option)


def fake_run(run: Path, with_config: bool) -> None:
    from sslmask.backbones import build_backbone

    run.mkdir(parents=True)
    state = {f"backbone.{k}": v for k, v in build_backbone("resnet_tiny").state_dict().items()}
    ckpt = {"method": state, "step": 0, **({"config": {}} if with_config else {})}
    torch.save(ckpt, run / "checkpoint.pt")


def test_export_into_a_missing_folder_is_refused(tmp_path, capsys):
    fake_run(tmp_path / "run", with_config=True)
    target = tmp_path / "no" / "such" / "dir" / "x.pt"
    one_line_failure(
        capsys, sslmask_main(["export", str(tmp_path / "run"), "--out", str(target)]), "does not exist"
    )
    assert not (tmp_path / "no").exists()


def test_resume_from_a_checkpoint_without_config_is_one_line(tmp_path, capsys, sample_build):
    fake_run(tmp_path / "run", with_config=False)
    rc = sslmask_main(["train", str(sample_build), "--method", "harl", "--config", "cpu-demo",
                       "--out", str(tmp_path / "run"), "--resume", "auto"])  # fmt: skip
    one_line_failure(capsys, rc, "checkpoint.pt", "not an sslmask run checkpoint")


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    from sslmask.engine import _truncate_log

    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"kind": "train", "step": s}) for s in (10, 20, 30)]
    log.write_text("\n".join(lines) + '\n{"kind": "train", "st')
    _truncate_log(log, 20)
    assert log.read_text().splitlines() == lines[:2]


def test_a_resume_at_an_epoch_start_logs_that_epoch_once(tmp_path):
    """Issue 35 item 8: log.jsonl got a duplicate epoch row per resume."""
    from sslmask.engine import _truncate_log

    log = tmp_path / "log.jsonl"
    rows = [{"kind": "epoch", "step": 0, "epoch": 0}, {"kind": "train", "step": 10},
            {"kind": "epoch", "step": 10, "epoch": 1}, {"kind": "train", "step": 12}]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _truncate_log(log, 10)  # the resumed run starts epoch 1 again and writes its row anew
    assert [json.loads(x) for x in log.read_text().splitlines()] == rows[:2]


def test_a_build_folder_named_shards_is_read(tmp_path, sample_build):
    build = tmp_path / "shards"
    shutil.copytree(sample_build, build)
    n = len(index_shards([str(sample_build)], require_masks=True))
    assert len(index_shards([str(build)], require_masks=True)) == n
    assert len(index_shards([str(build / "shards")], require_masks=True)) == n


def test_accuracies_are_exact_percentages():
    from sslmask.eval.knn import topk_accuracy

    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert topk_accuracy(scores, torch.tensor([0, 1, 1]), (1,)) == {"top1": 66.67}


def test_class_count_comes_from_the_labels_present_not_the_largest():
    from sslmask.eval.knn import knn_eval
    from sslmask.eval.linear import linear_probe

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=g)
    small = torch.arange(40) % 2
    huge = torch.where(small == 0, torch.tensor(5), torch.tensor(10**15))
    assert knn_eval(feats, huge, feats, huge, ks=(3,)) == knn_eval(feats, small, feats, small, ks=(3,))
    assert linear_probe(feats, huge, feats, huge, epochs=2) == linear_probe(
        feats, small, feats, small, epochs=2
    )


# ---- malformed shards: one validation path for every reader ------------------------------------

GOOD_META = {"key": "s0", "path": "s0.jpg", "label": 1, "status": "ok", "fg_fraction": 0.25}


def shard_bytes(members: list[tuple[str, bytes | None]]) -> bytes:
    """A tar with these members; ``None`` makes a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_members(key: str, meta: bytes, cls: bytes | None = None) -> list[tuple[str, bytes | None]]:
    mask = png_bytes(Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4)))
    members = [(f"{key}.jpg", jpeg_bytes(np.full((16, 16, 3), 120, np.uint8))), (f"{key}.mask.png", mask)]
    if cls is not None:
        members.append((f"{key}.cls", cls))
    return [*members, (f"{key}.json", meta)]


BAD_SAMPLES = {
    "label abc": sample_members("s0", json.dumps({**GOOD_META, "label": "abc"}).encode()),
    "label 2**70": sample_members("s0", json.dumps({**GOOD_META, "label": 2**70}).encode()),
    "json list": sample_members("s0", b"[1, 2]"),
    "json invalid": sample_members("s0", b"{not json"),
    "status list": sample_members("s0", json.dumps({**GOOD_META, "status": [1]}).encode()),
    "fg_fraction x": sample_members("s0", json.dumps({**GOOD_META, "fg_fraction": "x"}).encode()),
    "cls abc": sample_members("s0", json.dumps(GOOD_META).encode(), cls=b"abc"),
    "mask not png": sample_members("s0", json.dumps(GOOD_META).encode())[:1]
    + [("s0.mask.png", b"no png")]
    + [("s0.json", json.dumps(GOOD_META).encode())],
    "symlink member": [*sample_members("s0", json.dumps(GOOD_META).encode()), ("s1.jpg", None)],
}


def _readers(path: str) -> list:
    return [
        lambda: index_shards([path], require_masks=True),  # train, eval
        lambda: summarize([path]),  # sslmask inspect
        lambda: list(iter_samples([path])),
    ]


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_every_reader_names_shard_and_sample_of_a_malformed_field(tmp_path, case):
    path = tmp_path / "maskgen-000000.tar"
    path.write_bytes(shard_bytes(BAD_SAMPLES[case]))
    failures = 0
    for read in _readers(str(path)):
        try:
            read()
        except ShardError as exc:
            failures += 1
            assert "\n" not in str(exc) and str(path) in str(exc)
    # the trainer's index reads only labels (json/cls) and headers: a bad mask surfaces when a
    # batch decodes it, inspect and evaluation decode it at once
    assert failures == (2 if case == "mask not png" else 3)


def test_inspect_cli_refuses_a_link_member_in_one_line(tmp_path, capsys):
    path = tmp_path / "maskgen-000000.tar"
    path.write_bytes(shard_bytes(BAD_SAMPLES["symlink member"]))
    one_line_failure(capsys, sslmask_main(["inspect", str(path)]), str(path), "not a regular file")


def deep_fit_args(shards: Path, out: Path) -> list[str]:
    """``maskgen deep fit`` of a random tiny trunk on ``shards`` into ``out``: a reader of masks."""
    return [
        "deep",
        "fit",
        "--shards",
        str(shards),
        "--backbone",
        "random",
        "--arch",
        "resnet_tiny",
        "--out",
        str(out),
    ]


def build_with_member(tmp_path: Path, sample_build: Path, suffix: str, data: bytes) -> tuple[Path, Path, str]:
    """A copy of ``sample_build`` whose first shard's first ``*suffix`` member holds ``data``:
    ``(build, shard, the sample's key)``."""
    build = tmp_path / "b"
    shutil.copytree(sample_build, build)
    shard = build / "shards" / "maskgen-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    first = next(i for i, (n, _) in enumerate(members) if n.endswith(suffix))
    members[first] = (members[first][0], data)
    shard.write_bytes(shard_bytes(members))
    return build, shard, members[first][0].split(".")[0]


def test_maskgen_eval_names_the_sample_with_a_bad_json(tmp_path, capsys, sample_build):
    build, shard, key = build_with_member(tmp_path, sample_build, ".json", b'{"label": "abc"}')
    one_line_failure(capsys, maskgen_main(["eval", str(build)]), str(shard), key, "label")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    meta=st.one_of(
        st.binary(max_size=40),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
            ),
            max_leaves=8,
        ).map(lambda v: json.dumps(v).encode()),
        st.dictionaries(
            st.sampled_from(["label", "status", "fg_fraction", "path", "width", "iou", "method_params"]),
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats()
            | st.text(max_size=6)
            | st.lists(st.integers()),
        ).map(lambda d: json.dumps({**GOOD_META, **d}).encode()),
    ),
    cls=st.none() | st.binary(max_size=12),
    member=st.sampled_from(["s0.extra", "../up.jpg", "/abs.jpg", "sub/s0.jpg", "noext", None]),
)
def test_random_corruption_gives_one_line_errors_only(tmp_path, meta, cls, member):
    members = sample_members("s0", meta, cls)
    if member is not None:
        members.append((member, b"x"))
    path = tmp_path / "maskgen-000000.tar"
    path.write_bytes(shard_bytes(members))
    for read in _readers(str(path)):
        try:
            read()
        except ShardError as exc:
            assert "\n" not in str(exc)


class FullDiskIO(io.FileIO):
    """A file whose writes fail as on a full disk (ENOSPC)."""

    def write(self, data):
        raise OSError(28, "No space left on device")


def full_disk_open(path, mode="r"):
    raw = FullDiskIO(path, mode.replace("b", "").replace("t", ""))
    return raw if "b" in mode else io.TextIOWrapper(raw)


def test_a_full_disk_is_one_line_and_leaves_no_temp(tmp_path, capsys, monkeypatch, sample_build):
    import maskio.atomic

    build = tmp_path / "b"
    shutil.copytree(sample_build, build)
    before = sorted(p.name for p in build.rglob("*"))
    monkeypatch.setattr(maskio.atomic, "open", full_disk_open, raising=False)
    rc = maskgen_main([*BUILD[:-4], "--sample-size", "30", "--shard-size", "16", "--method", "center",
                       "--save-saliency", "--executor", "local", "--no-progress", "--out", str(build)])  # fmt: skip
    line = one_line_failure(capsys, rc, "no space left on device (writing)")
    assert str(build) in line
    assert sorted(p.name for p in build.rglob("*") if p.name != ".lock") == [
        n for n in before if n != ".lock"
    ]

    run = tmp_path / "run"
    rc = sslmask_main(["train", str(sample_build), "--method", "byol", "--config", "cpu-demo", "--out", str(run),
                       "--set", "train.epochs=1", "--set", "data.batch_size=8", "--set", "data.workers=0"])  # fmt: skip
    line = one_line_failure(capsys, rc, "no space left on device (writing)")
    assert str(run) in line
    assert not [p for p in run.iterdir() if ".tmp" in p.name]

    # issue 47: eval --out on a full disk named no path and left a 0-byte knn.tmp
    result = tmp_path / "res" / "knn.json"
    rc = sslmask_main(["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny", "--workers", "0",
                       "--train", str(sample_build), "--val", str(sample_build), "--out", str(result)])  # fmt: skip
    one_line_failure(capsys, rc, str(result), "no space left on device (writing)")
    assert not list(result.parent.iterdir())


@pytest.mark.parametrize(
    ("doctor", "needle"),
    [("nan", "NaN"), ("int64", "is int64, not floating point"), ("negative variance", "negative variances")],
)
def test_a_head_with_unusable_weights_is_refused_before_the_build(tmp_path, capsys, doctor, needle):
    """Each would send every mask of the build to the centre-prior fallback (issue 47)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from maskgen.methods.deep.model import HeadFileError, SaliencyNet, load_head, save_head
    from sslmask.backbones import build_backbone

    net = SaliencyNet(build_backbone("resnet_tiny", 16))
    head = tmp_path / "bad.safetensors"
    save_head(net, head, {"arch": "resnet_tiny", "out_stride": 16, "short_side": 48})
    with safe_open(str(head), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    first = next(k for k in state if k.endswith("weight"))
    if doctor == "nan":
        state[first] = torch.full_like(state[first], float("nan"))
    elif doctor == "int64":
        state[first] = state[first].round().to(torch.int64)
    else:
        var = next(k for k in state if k.endswith("running_var"))
        state[var] = -torch.ones_like(state[var])
    save_file(state, str(head), metadata=meta)
    with pytest.raises(HeadFileError, match=needle):
        load_head(head)
    out = tmp_path / "out"
    rc = maskgen_main([*BUILD, "--method", "deep", "--head", str(head), "--out", str(out)])
    one_line_failure(capsys, rc, str(head), needle)
    assert not out.exists() or not any(out.rglob("*.tar"))


def test_a_checkpoint_on_a_full_disk_is_an_oserror_naming_it(tmp_path, monkeypatch):
    import maskio.atomic
    from sslmask.checkpoint import save_atomic

    monkeypatch.setattr(maskio.atomic, "open", full_disk_open, raising=False)
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(OSError, match="No space left on device") as info:
        save_atomic({"w": torch.zeros(1000)}, target)  # torch.save alone raises an opaque RuntimeError
    assert info.value.filename == str(target) and list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_shape_is_one_line(tmp_path, capsys, sample_build):
    from sslmask.backbones import build_backbone

    path = tmp_path / "r18.pt"
    torch.save(build_backbone("resnet18").state_dict(), path)
    rc = sslmask_main(["eval", "knn", "--checkpoint", str(path), "--arch", "resnet34", "--image-size", "32",
                       "--train", str(sample_build), "--val", str(sample_build)])  # fmt: skip
    one_line_failure(capsys, rc, str(path), "does not fit resnet34")
    rc = sslmask_main(["eval", "knn", "--checkpoint", str(path), "--arch", "resnet9", "--image-size", "32",
                       "--train", str(sample_build), "--val", str(sample_build)])  # fmt: skip
    one_line_failure(capsys, rc, "resnet9")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    rc = sslmask_main(["eval", "knn", "--checkpoint", str(tmp_path / "junk.pt"), "--image-size", "32",
                       "--train", str(sample_build), "--val", str(sample_build)])  # fmt: skip
    one_line_failure(capsys, rc, "junk.pt", "not a loadable checkpoint")


def _corrupt(data: bytes, kind: str, cut: int = 0) -> bytes:
    """A shard as it arrives broken: cut short, compressed, emptied, or a tar inside a tar."""
    import bz2
    import gzip

    if kind == "truncated":
        return data[: max(1, min(cut, len(data) - 1))]
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "bz2":
        return bz2.compress(data)
    if kind == "empty":
        return b""
    return shard_bytes([("s0.tar", data)])  # nested: a tar of the shard (member has no image)


TAR_CASES = ["truncated", "gzip", "bz2", "empty"]


@pytest.mark.parametrize("kind", TAR_CASES)
def test_a_broken_tar_is_one_line_in_every_command(tmp_path, capsys, sample_build, kind):
    """Issue 35 item 3: tarfile.ReadError tracebacks in train, eval, deep fit and maskgen eval."""
    build = tmp_path / "b"
    shutil.copytree(sample_build, build)
    shard = build / "shards" / "maskgen-000001.tar"
    shard.write_bytes(_corrupt(shard.read_bytes(), kind, cut=shard.stat().st_size // 2))
    need = [str(shard), "not a readable tar"]
    common = ["--image-size", "32", "--workers", "0"]
    one_line_failure(capsys, sslmask_main(["inspect", str(build)]), *need)
    one_line_failure(capsys, sslmask_main(["train", str(build), "--method", "byol", "--config", "cpu-demo",
                                           "--out", str(tmp_path / "run")]), *need)  # fmt: skip
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    one_line_failure(capsys, sslmask_main(["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny",
                                           "--train", str(build), "--val", str(build), *common]), *need)  # fmt: skip
    # maskgen eval knows the build's own sizes: a shard of another size is a replaced one (issue 47)
    line = one_line_failure(capsys, maskgen_main(["eval", str(build)]), str(shard))
    assert "not a readable tar" in line or "replaced after the build" in line, line
    one_line_failure(capsys, maskgen_main(["deep", "fit", "--shards", str(build), "--backbone", "random",
                                           "--arch", "resnet_tiny", "--out", str(tmp_path / "h.safetensors"),
                                           "--epochs", "1", "--short-side", "32"]), *need)  # fmt: skip
    assert not (tmp_path / "h.safetensors").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([*TAR_CASES, "nested"]), fraction=st.floats(0.0, 1.0))
def test_tar_level_corruption_gives_one_line_errors_only(tmp_path, kind, fraction):
    data = shard_bytes(sample_members("s0", json.dumps(GOOD_META).encode(), None))
    path = tmp_path / "maskgen-000000.tar"
    path.write_bytes(_corrupt(data, kind, cut=int(len(data) * fraction)))
    for read in _readers(str(path)):
        try:
            read()
        except ShardError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)


@pytest.mark.parametrize("target", ["checkpoint.pt", "config.yaml", "log.jsonl"])
def test_export_refuses_to_overwrite_the_runs_own_files(tmp_path, capsys, target):
    """Issue 35 item 7: `sslmask export RUN --out RUN/checkpoint.pt` destroyed the resumable run."""
    from sslmask.checkpoint import save_atomic
    from sslmask.config import load_settings
    from sslmask.methods import build_method

    cfg = load_settings("byol", "cpu-demo")
    run = tmp_path / "run"
    run.mkdir()
    save_atomic(
        {"method": build_method(cfg).state_dict(), "step": 1, "config": cfg.to_config()},
        run / "checkpoint.pt",
    )
    for name in ("config.yaml", "log.jsonl"):
        (run / name).write_text("kept\n")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    one_line_failure(capsys, sslmask_main(["export", str(run), "--out", str(run / target)]), target, "run")
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    assert sslmask_main(["export", str(run), "--out", str(run / "backbone.pt")]) == 0  # beside them is fine


@pytest.mark.parametrize(
    ("command", "option"),
    [(["knn"], "--temperature"), (["linear"], "--lr"), (["occlusion"], "--ratios")],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_in_one_line(tmp_path, capsys, sample_build, command, option, value):
    """Issue 35 item 8: NaN passed click's ranges and the result JSON held NaN."""
    rc = sslmask_main(["eval", *command, "--checkpoint", "random", "--arch", "resnet_tiny", "--train",
                       str(sample_build), "--val", str(sample_build), option, value])  # fmt: skip
    one_line_failure(capsys, rc, option, "finite" if value == "nan" else option)


def _class_tree(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/i.png``: each class a flat colour (its value), two images each."""
    for name, value in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), value + 3 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def test_val_classes_are_matched_to_train_classes_by_name(tmp_path, capsys):
    """Issue 35 item 5: val class folders were matched to train's by sorted position, so a val
    split with fewer classes scored against the wrong ones."""
    train = _class_tree(tmp_path / "train", {"apple": 20, "banana": 120, "cherry": 220})
    val = _class_tree(tmp_path / "val", {"banana": 120, "cherry": 220})  # positions 0, 1; train's 1, 2
    rc = sslmask_main(["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny", "--train", str(train),
                       "--val", str(val), "--image-size", "32", "--workers", "0", "--k", "1"])  # fmt: skip
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"]["k=1"]["top1"] == 100.0  # same pictures, matched by name
    stray = _class_tree(tmp_path / "stray", {"banana": 120, "durian": 60})
    rc = sslmask_main(["eval", "linear", "--checkpoint", "random", "--arch", "resnet_tiny", "--train", str(train),
                       "--val", str(stray), "--image-size", "32", "--workers", "0", "--epochs", "1"])  # fmt: skip
    one_line_failure(capsys, rc, str(stray), "durian", "not among")


def test_align_labels_maps_build_class_names():
    from maskio.records import Records, align_labels

    def records(labels, classes):
        n = len(labels)
        return Records(["x"] * n, np.zeros((n, 3), np.int64), None, np.asarray(labels), [], classes)

    train = records([0, 1, 2], ["a", "b", "c"])
    val = align_labels(train, records([1, 0, 1], ["b", "c"]))
    assert val.labels.tolist() == [2, 1, 2] and val.classes == ["a", "b", "c"]
    same = records([0, 1], None)  # unnamed: taken as they are
    assert align_labels(train, same) is same
    twice = records([0, 1], ["b", "b"])  # a name used twice (the sample source's "photo"): as they are
    assert align_labels(train, twice) is twice
    with pytest.raises(ShardError, match="'z' is not among"):
        align_labels(train, records([0], ["z"]))


def test_a_huge_mask_or_image_is_refused_from_its_header(tmp_path, capsys, sample_build):
    """Issue 35 item 4: a 30000^2 mask was decoded in full by maskgen eval (killed at 23 GB) and
    a 15000^2 ground-truth mask was a DecompressionBombError traceback in eval localization."""
    from conftest import png_with_forged_size

    from maskio.records import decode_rgb
    from maskio.shard_format import decode_mask_png

    bomb = png_with_forged_size(30000, 30000)
    with pytest.raises(ShardError, match="30000x30000 pixels exceeds"):
        decode_rgb(bomb, "x.png")
    with pytest.raises(ShardError, match="30000x30000 pixels exceeds"):  # ShardFormatError, a ShardError
        decode_mask_png(bomb)
    build, shard, _ = build_with_member(tmp_path, sample_build, ".mask.png", bomb)
    one_line_failure(capsys, maskgen_main(["eval", str(build)]), str(shard), "exceeds the limit")
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "a.png").write_bytes(png_with_forged_size(15000, 15000))
    rc = sslmask_main(["eval", "localization", "--checkpoint", "random", "--arch", "resnet_tiny", "--val",
                       str(sample_build), "--gt-masks", str(gt), "--agnostic", "--workers", "0"])  # fmt: skip
    one_line_failure(capsys, rc, str(gt / "a.png"), "exceeds the limit")


def test_image_sizes_have_an_upper_bound(tmp_path, capsys, sample_build):
    """Issue 35 item 4: --image-size 100000 (22 GB) and data.image_size=1000000000 (MemoryError)."""
    rc = sslmask_main(["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny", "--train",
                       str(sample_build), "--val", str(sample_build), "--image-size", "100000"])  # fmt: skip
    one_line_failure(capsys, rc, "--image-size", "100000")
    rc = sslmask_main(["train", str(sample_build), "--method", "byol", "--out", str(tmp_path / "r"),
                       "--set", "data.image_size=1000000000"])  # fmt: skip
    one_line_failure(capsys, rc, "data.image_size=1000000000", "4096")
    assert not (tmp_path / "r").exists()


def test_more_bad_options_and_fields_are_one_line(tmp_path, capsys, sample_build):
    """Issue 35 item 6: an unknown --arch, a huge --grid, a JSON nested 100,000 deep, and a
    sample source too large to plan (it hung in --dry-run)."""
    base = [
        "--checkpoint",
        "random",
        "--train",
        str(sample_build),
        "--val",
        str(sample_build),
        "--workers",
        "0",
    ]
    one_line_failure(capsys, sslmask_main(["eval", "knn", *base, "--arch", "resnet9000"]), "resnet9000")
    rc = sslmask_main(
        ["eval", "occlusion", *base, "--arch", "resnet_tiny", "--image-size", "32", "--grid", "64"]
    )
    one_line_failure(capsys, rc, "--grid 64")
    one_line_failure(capsys, sslmask_main(["eval", "occlusion", *base, "--arch", "resnet_tiny", "--grid", "1000000"]),
                     "--grid")  # fmt: skip
    rc = maskgen_main(["build", "--source", "sample", "--sample-size", "2000000000", "--dry-run", "--method",
                       "center", "--out", str(tmp_path / "o")])  # fmt: skip
    one_line_failure(capsys, rc, "--sample-size")
    members = sample_members("s0", b"[" * 100_000 + b"]" * 100_000, None)
    path = tmp_path / "maskgen-000000.tar"
    path.write_bytes(shard_bytes(members))
    for read in _readers(str(path)):
        with pytest.raises(ShardError, match="nested too deeply"):
            read()


def test_bad_boxes_and_a_split_without_queries_are_refused(tmp_path, capsys):
    """Issue 35 item 8: NaN, negative and 1e308 CUB boxes were accepted; retrieval on a split with
    no two images of a class reported 0.0 with rc 0."""
    from sslmask.eval.localization import read_boxes

    cub = tmp_path / "cub"
    cub.mkdir()
    (cub / "images.txt").write_text("1 a/x.jpg\n2 a/y.jpg\n")
    for bad in ("nan 0 5 5", "-3 0 5 5", "0 0 1e308 5", "0 0 0 5"):
        (cub / "bounding_boxes.txt").write_text(f"1 0 0 5 5\n2 {bad}\n")
        with pytest.raises(ShardError, match="is not a box"):
            read_boxes(str(cub), None)
    (cub / "bounding_boxes.txt").write_text("1 0 0 5 5\n2 1 1 3 3\n")
    assert read_boxes(str(cub), None) == {"a__x": [(0.0, 0.0, 5.0, 5.0)], "a__y": [(1.0, 1.0, 4.0, 4.0)]}
    tree = _class_tree(tmp_path / "one-each", {"a": 10, "b": 100})
    for cls in ("a", "b"):
        (tree / cls / "1.png").unlink()
    rc = sslmask_main(["eval", "retrieval", "--checkpoint", "random", "--arch", "resnet_tiny", "--data", str(tree),
                       "--image-size", "32", "--workers", "0"])  # fmt: skip
    one_line_failure(capsys, rc, str(tree), "two per class")


def _broken_head(tmp_path, kind: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from maskgen.methods.deep.method import DEFAULT_HEAD

    with safe_open(str(DEFAULT_HEAD), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    first = sorted(tensors)[0]
    if kind == "missing":
        tensors.pop(first)
    elif kind == "shape":
        tensors[first] = torch.zeros(3)
    elif kind == "extra":
        tensors["extra.weight"] = torch.zeros(3)
    else:
        meta[kind] = {"arch": '"resnet9000"', "out_stride": "7", "decoder": '"transformer"'}[kind]
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["missing", "shape", "extra", "arch", "out_stride", "decoder"])
def test_a_bad_head_is_refused_before_the_build(tmp_path, capsys, kind):
    """Issue 35 item 2: a head with missing, misshapen or extra tensors or bad metadata gave exit 0,
    "0 images" and a shard marked done."""
    head = _broken_head(tmp_path, kind)
    out = tmp_path / "out"
    rc = maskgen_main([*BUILD, "--method", "deep", "--head", str(head), "--out", str(out)])
    one_line_failure(capsys, rc, str(head))
    assert not out.exists()


def test_a_method_that_fails_on_every_image_fails_the_build(tmp_path, capsys, monkeypatch):
    """Issue 35 item 2: a build whose every image failed for one method-level reason exited 0 and
    marked its shard complete, so a fixed re-run needed --overwrite."""
    from maskgen.methods.center import CenterPrior

    def broken(self, images):
        raise RuntimeError("the method is misconfigured")

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(CenterPrior, "predict", broken)
        rc = maskgen_main([*BUILD, "--method", "center", "--out", str(out)])
    line = one_line_failure(capsys, rc, "failed on all", "misconfigured")
    assert "re-run" in line
    assert (
        not list((out / "shards").glob("*.tar"))
        and not json.loads((out / "manifest.json").read_text())["complete"]
    )
    assert (
        maskgen_main([*BUILD, "--method", "center", "--out", str(out)]) == 0
    )  # fixed: no --overwrite needed
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_readers_and_a_rebuild_never_overlap(tmp_path, capsys, sample_build):
    """Issue 35 item 5: train/eval started on a build still being written, and build --overwrite
    deleted the shards under a live trainer. Readers share OUT/.lock; the build holds it alone."""
    from maskgen.pipeline import build_lock
    from maskio.buildlock import reading_builds

    build = tmp_path / "b"
    shutil.copytree(sample_build, build)
    knn = ["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny", "--train", str(build), "--val",
           str(build), "--image-size", "32", "--workers", "0"]  # fmt: skip
    with build_lock(build):  # a build is writing it
        one_line_failure(capsys, sslmask_main(knn), str(build), "is writing it")
        one_line_failure(capsys, sslmask_main(["train", str(build), "--method", "byol", "--out",
                                               str(tmp_path / "run")]), "is writing it")  # fmt: skip
    assert sslmask_main(knn) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (build / "shards").iterdir())
    rebuild = ["build", "--source", "sample", "--sample-size", "30", "--method", "center", "--out", str(build),
               "--overwrite", "--executor", "local", "--no-progress"]  # fmt: skip
    # a trainer reading the folder, or (issue 47 item 2) its shards by glob or by name, which took no lock
    for spec in (build, build / "shards" / "*.tar", build / "shards" / "maskgen-000001.tar"):
        with reading_builds([str(spec)]):
            one_line_failure(capsys, maskgen_main(rebuild), str(build), "reading it", f"pid {os.getpid()}")
    assert sorted(p.name for p in (build / "shards").iterdir()) == before


def test_an_incomplete_build_is_not_read_as_a_whole(tmp_path, capsys, sample_build):
    build = tmp_path / "b"
    shutil.copytree(sample_build, build)
    manifest = json.loads((build / "manifest.json").read_text())
    (build / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    one_line_failure(
        capsys, sslmask_main(["inspect", str(build)]), str(build), "not complete", "shards/*.tar"
    )
    assert sslmask_main(["inspect", str(build / "shards" / "*.tar")]) == 0  # its shards, named, are read


def test_a_ground_truth_mask_of_another_size_is_refused(tmp_path, capsys):
    """Issue 35 item 8: a 5x5 ground-truth mask was scaled as if it were its 40x40 image's."""
    tree = _class_tree(tmp_path / "val", {"a": 30})
    gt = tmp_path / "gt" / "a"
    gt.mkdir(parents=True)
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(gt / "0.png")
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(gt / "1.png")
    rc = sslmask_main(["eval", "localization", "--checkpoint", "random", "--arch", "resnet_tiny", "--val", str(tree),
                       "--gt-masks", str(tmp_path / "gt"), "--agnostic", "--workers", "0", "--image-size", "32"])  # fmt: skip
    one_line_failure(capsys, rc, "5x5", "40x40")


def test_maskgen_eval_refuses_a_mask_of_another_size(tmp_path, capsys, sample_build):
    """Issue 35 item 8: a mask of another size than its image gave numpy warnings and an
    S-measure of NaN in maskgen eval."""
    build, shard, _ = build_with_member(
        tmp_path, sample_build, ".mask.png", png_bytes(Image.new("L", (5, 5), 255))
    )
    line = one_line_failure(capsys, maskgen_main(["eval", str(build)]), str(shard), "5x5", "its image")
    assert "Warning" not in capsys.readouterr().err + line


def test_a_plain_pickle_is_refused_in_exactly_one_line(tmp_path, capsys):
    """Issue 35 item 8: torch printed a two-line pickle-protocol warning before the refusal."""
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    one_line_failure(capsys, sslmask_main(["export", str(path), "--out", str(tmp_path / "x.pt")]),
                     "plain.pkl", "not a loadable checkpoint")  # fmt: skip


def test_a_checkpoint_whose_config_lacks_model_is_one_line(tmp_path, capsys, sample_build):
    """Issue 35 item 6: a run checkpoint whose config has no model section (KeyError traceback)."""
    from sslmask.checkpoint import save_atomic
    from sslmask.config import load_settings
    from sslmask.methods import build_method

    cfg = load_settings("byol", "cpu-demo")
    state = build_method(cfg).state_dict()
    save_atomic({"method": state, "step": 1, "config": {k: v for k, v in cfg.to_config().items() if k != "model"}},
                tmp_path / "ckpt.pt")  # fmt: skip
    rc = sslmask_main(["eval", "knn", "--checkpoint", str(tmp_path / "ckpt.pt"), "--train", str(sample_build),
                       "--val", str(sample_build), "--workers", "0", "--image-size", "32"])  # fmt: skip
    one_line_failure(capsys, rc, "ckpt.pt", "no model section")


def test_a_model_too_large_for_this_machine_is_refused_before_allocating(tmp_path, capsys, sample_build):
    """Issue 47 item 7: ``model.proj_hidden=100000000`` allocated until it failed (51 GB)."""
    from conftest import refused_train

    err = refused_train("byol", sample_build, tmp_path / "run", ["model.proj_hidden=100000000"], capsys)
    assert "GiB available" in err and "model.proj_hidden" in err
    assert not (tmp_path / "run").exists()


def test_an_image_size_too_large_for_this_machine_is_refused_before_allocating(
    monkeypatch, capsys, sample_build
):
    """Issue 47 item 7: ``eval knn --image-size 4096`` is in range and allocated tens of GB; the
    estimate (one image through a meta-device copy) is checked against the memory left, here
    pinned to 8 GiB so the test means the same on every machine."""
    import maskio.memory

    monkeypatch.setattr(maskio.memory, "available_bytes", lambda: 8 * 2**30)
    base = ["eval", "knn", "--checkpoint", "random", "--arch", "resnet_tiny", "--workers", "0",
            "--train", str(sample_build), "--val", str(sample_build)]  # fmt: skip
    one_line_failure(capsys, sslmask_main([*base, "--image-size", "4096"]), "4096 px", "GiB available",
                     "lower --image-size or --batch-size")  # fmt: skip
    assert sslmask_main([*base, "--image-size", "32"]) == 0
    capsys.readouterr()
    rc = maskgen_main(["deep", "fit", "--shards", str(sample_build), "--backbone", "random", "--arch", "resnet_tiny",
                       "--short-side", "4000", "--out", str(sample_build.parent / "never.safetensors")])  # fmt: skip
    one_line_failure(capsys, rc, "4000 px", "GiB available", "lower --short-side or --batch-size")
    assert not (sample_build.parent / "never.safetensors").exists()
