"""`maskgen build` end to end on small data: the shard contract, resume rules, CLI errors."""

from __future__ import annotations

import json
import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds
from conftest import maskgen_cmd

from maskgen.cli import main
from maskio.shard_format import META_KEYS, shard_paths


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(maskgen_cmd(*args), capture_output=True, text=True, timeout=300)


def test_contract_files_and_fields(sample_build):
    out = sample_build
    for name in ("manifest.json", "index.json", "report.json", "report.html", "errors.jsonl"):
        assert (out / name).is_file(), name
    shards = shard_paths(out)
    assert [p.name for p in shards] == ["maskgen-000000.tar", "maskgen-000001.tar", "maskgen-000002.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_shards"] == 3 and manifest["n_samples"] == 42
    assert manifest["versions"]["maskgen"] and manifest["method"] == "center"
    assert manifest["command"].startswith("maskgen build --source sample --sample-size 30 ")
    index = json.loads((out / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert sum(s["nsamples"] for s in index["shardlist"]) == 42
    assert index["shardlist"][0]["filesize"] == shards[0].stat().st_size

    report = json.loads((out / "report.json").read_text())
    for key in ("n_images", "n_errors", "miou", "mae", "max_fbeta", "s_measure", "e_measure",
                "fg_fraction_mean", "images_per_second", "method", "method_params"):  # fmt: skip
        assert key in report, key
    assert report["n_images"] == 42 and report["n_with_gt"] == 30 and 0 < report["miou"] < 1

    field_sets = set()
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        keys = []
        for m in members:
            key, ext = m.name.split(".", 1)
            if not keys or keys[-1][0] != key:
                keys.append((key, []))
            keys[-1][1].append(ext)
        field_sets |= {tuple(exts) for _, exts in keys}
    assert field_sets == {("jpg", "mask.png", "sal.png", "cls", "json")}  # same files, contract order


def test_reads_back_with_webdataset(sample_build):
    urls = [str(p) for p in shard_paths(sample_build)]
    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        meta = s["json"]
        assert tuple(meta) == META_KEYS
        img, mask = s["jpg"], s["mask.png"]
        assert img.shape[:2] == mask.shape[:2] == (meta["height"], meta["width"])
        assert set(np.unique(mask)) <= {0, 255}
        assert s["cls"] == meta["label"]
        assert meta["fg_fraction"] == pytest.approx((mask[..., 0] > 0).mean())
        if meta["path"].startswith("scenes/"):
            assert meta["iou"] is not None and meta["reencoded"] is False
        else:
            assert meta["iou"] is None
        n += 1
    assert n == 42


def test_reads_back_with_huggingface_datasets(sample_build, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    files = [str(p) for p in shard_paths(sample_build)]
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                               cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert len(ds) == 42
    assert {"jpg", "mask.png", "sal.png", "cls", "json"} <= set(ds.column_names)
    row = ds[0]
    assert row["jpg"].size == row["mask.png"].size
    assert row["json"]["key"] == row["__key__"]


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["build", "--method", "center", "--out", str(out), "--sample-size", "10", "--dry-run"]) == 0
    assert not out.exists()
    plan = capsys.readouterr().out
    assert "22 images" in plan and "0 shards already complete, 1 to build" in plan


def test_resume_skips_done_shards_and_refuses_other_options(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["build", "--method", "center", "--out", str(out), "--sample-size", "8", "--shard-size", "10",
            "--executor", "local", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    tar = out / "shards" / "maskgen-000001.tar"
    before = tar.read_bytes()
    mtime = tar.stat().st_mtime_ns
    (out / "shards" / "maskgen-000000.stats.json").unlink()  # as if killed before the marker
    assert main(args + ["--dry-run"]) == 0
    assert "1 shards already complete, 1 to build" in capsys.readouterr().out
    assert main(args) == 0
    assert tar.stat().st_mtime_ns == mtime and tar.read_bytes() == before  # skipped, untouched
    assert (out / "shards" / "maskgen-000000.stats.json").exists()

    assert main(args + ["--threshold", "otsu"]) == 1
    assert "other inputs or options" in capsys.readouterr().err
    assert main(args + ["--threshold", "otsu", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["threshold"] == "otsu"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "folder", "--root", "{tmp}/missing"], "no such directory"),
        (["--source", "folder", "--root", "{tmp}/empty"], "no images found"),
        (["--method", "nosuch"], "Invalid value for '--method'"),
        (["--source", "folder"], "needs --root"),
        (["--gt", "{tmp}"], "--gt is not used by --source sample"),
        (
            ["--source", "folder", "--root", "{tmp}", "--no-photos"],
            "--no-photos is not used by --source folder",
        ),
        (["--threshold", "2"], "not in [0, 1]"),
    ],
)
def test_bad_invocations_are_one_line_errors_and_write_nothing(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--method" not in argv:
        argv += ["--method", "center"]
    res = run("build", *argv, "--out", str(out))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()


def test_sample_without_photos_is_scenes_only(tmp_path):
    out = tmp_path / "out"
    assert main(["build", "--method", "center", "--out", str(out), "--sample-size", "4", "--no-photos",
                 "--seed", "1", "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    with tarfile.open(out / "shards" / "maskgen-000000.tar") as tar:
        keys = sorted({n.split(".")[0] for n in tar.getnames()})
    assert keys == [f"scenes__{i:06d}" for i in range(4)]


def test_out_holding_other_files_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = run("build", "--method", "center", "--out", str(out), "--sample-size", "2", "--executor", "local")
    assert res.returncode == 1 and "not a maskgen build" in res.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_masks_only_and_limit(tmp_path):
    out = tmp_path / "out"
    assert main(["build", "--method", "center", "--out", str(out), "--sample-size", "6", "--limit", "5",
                 "--image-format", "none", "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    with tarfile.open(out / "shards" / "maskgen-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 5 * 3 and not any(n.endswith(".jpg") for n in names)


def test_eval_reproduces_the_build_report(sample_build, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(sample_build, out)
    built = json.loads((out / "report.json").read_text())
    res = run("eval", str(out))
    assert res.returncode == 0, res.stderr
    again = json.loads((out / "report.json").read_text())
    assert again["sod_input"] == "saliency"  # the build kept sal.png, so eval sees the same soft maps
    for key in ("n_images", "n_with_gt", "miou", "dataset_iou", "mae", "max_fbeta", "s_measure", "e_measure",
                "weighted_f", "fg_fraction_mean"):  # fmt: skip
        assert again[key] == pytest.approx(built[key], rel=1e-9), key
    assert again["best_iou"] == built["best_iou"] and again["worst_iou"] == built["worst_iou"]


def test_huggingface_loader_with_explicit_features_when_first_samples_lack_ground_truth(
    tmp_path, monkeypatch
):
    """Partial ground truth: the loader's 5-sample schema guess types `iou` as null; hf_features fixes it."""
    datasets = pytest.importorskip("datasets")
    from conftest import gradient_rgb, jpeg_bytes
    from PIL import Image

    from maskio.shard_format import hf_features

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, gt = tmp_path / "img", tmp_path / "gt"
    root.mkdir()
    gt.mkdir()
    for i in range(8):
        (root / f"{i:02d}.jpg").write_bytes(jpeg_bytes(gradient_rgb(20, 24, i)))
    for i in (6, 7):  # only the last two images have ground truth
        Image.new("L", (24, 20), 255).save(gt / f"{i:02d}.png")
    out = tmp_path / "out"
    assert main(["build", "--source", "folder", "--root", str(root), "--gt", str(gt), "--method", "center",
                 "--out", str(out), "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    files = [str(p) for p in shard_paths(out)]
    with pytest.raises(Exception, match="generating the dataset"):
        datasets.load_dataset(
            "webdataset", data_files={"train": files}, split="train", cache_dir=str(tmp_path / "c1")
        )
    manifest = json.loads((out / "manifest.json").read_text())
    feats = hf_features(manifest["method_params"], labels=False)
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", features=feats,
                               cache_dir=str(tmp_path / "c2"))  # fmt: skip
    assert [r["iou"] for r in ds["json"]] == [None] * 6 + [pytest.approx(0.27, abs=0.05)] * 2


def test_eval_with_a_ground_truth_folder_given_afterwards(tmp_path):
    from PIL import Image

    from maskgen.sources.synthetic import render_scene

    root, gt = tmp_path / "img", tmp_path / "gt"
    (root / "a").mkdir(parents=True)
    (gt / "a").mkdir(parents=True)
    masks = {}
    for i in range(5):
        rgb, mask, _ = render_scene(4, i)
        Image.fromarray(rgb).save(root / "a" / f"{i}.jpg", quality=95)
        Image.fromarray(mask.astype(np.uint8) * 255).save(gt / "a" / f"{i}.png")
        masks[f"a/{i}.jpg"] = mask
    out = tmp_path / "out"
    assert main(["build", "--source", "folder", "--root", str(root), "--method", "center", "--out", str(out),
                 "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    assert json.loads((out / "report.json").read_text())["miou"] is None  # no ground truth at build time
    res = run("eval", str(out), "--gt", str(gt))
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["n_with_gt"] == 5 and report["sod_input"] == "mask"
    expected = []
    for s in wds.WebDataset([str(p) for p in shard_paths(out)], shardshuffle=False).decode("l8"):
        m = s["mask.png"] > 127
        g = masks[s["json"]["path"]]
        expected.append((m & g).sum() / (m | g).sum())
    assert report["miou"] == pytest.approx(np.mean(expected))
    bad = run("eval", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and "not a maskgen build" in bad.stderr


def test_a_method_failing_on_one_image_costs_that_image_only(tmp_path, monkeypatch):
    """A batch that raises is retried image by image; only the bad image is recorded and skipped."""
    from maskgen.methods.center import CenterPrior

    original = CenterPrior.predict

    def flaky(self, images):
        if any(im.shape[:2] == (20, 30) for im in images):
            raise RuntimeError("model blew up")
        return original(self, images)

    monkeypatch.setattr(CenterPrior, "predict", flaky)
    from PIL import Image

    root = tmp_path / "img"
    root.mkdir()
    for i, size in enumerate([(24, 32), (30, 20), (40, 40)]):  # PIL size is (w, h): image 1 is 20 x 30
        Image.new("RGB", size, (i * 40, 80, 120)).save(root / f"{i}.png")
    out = tmp_path / "out"
    assert main(["build", "--source", "folder", "--root", str(root), "--method", "center", "--out", str(out),
                 "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["path"], e["stage"], e["reason"]) for e in errors] == [("1.png", "method", "RuntimeError")]
    assert json.loads((out / "report.json").read_text())["n_images"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_second_build_of_the_same_out_stops_with_one_line_and_loses_nothing(tmp_path, executor):
    """Two builds into one OUT: the second exits with one line naming the first's PID, the
    first finishes with a complete record that eval and inspect accept."""
    import os
    import time

    out = tmp_path / "out"
    args = ["build", "--source", "sample", "--sample-size", "24", "--no-photos", "--method", "drfi",
            "--shard-size", "8", "--out", str(out), "--no-progress", "--executor", executor, "--workers", "1"]  # fmt: skip
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    first = subprocess.Popen(maskgen_cmd(*args), stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.05)
    assert first.poll() is None, "the first build ended before the second started"
    second = subprocess.run(maskgen_cmd(*args), capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"maskgen: error: --out {out}: another maskgen build (pid {first.pid}) is writing here; "
        "wait for it to finish, then re-run to resume"
    ]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_samples"] == 24 and len(manifest["runs"]) == 1
    assert not [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]
    assert main(["eval", str(out)]) == 0
    again = subprocess.run(maskgen_cmd(*args), capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr  # the lock went with the first process


def test_report_html_escapes_what_the_build_read(tmp_path):
    """File names and error texts reach report.html escaped (the template autoescapes): a photo
    named like markup shows as text, never as an element."""
    from PIL import Image

    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        root / "<img src=x onerror=alert(1)>.png"
    )
    (root / "<svg onload=alert(2)>.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "b"
    assert main(["build", "--source", "folder", "--root", str(root), "--method", "center", "--out", str(out),
                 "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    page = (out / "report.html").read_text()
    assert "<img src=x" not in page and "<svg onload" not in page
    assert "<td>&lt;svg onload=alert(2)&gt;.jpg</td>" in page  # the skipped file's path, as text
    assert "<figcaption>img_src_x_onerror_alert_1<br>" in page  # keys are sanitised names
    assert page.count("<figure>") == 1 and "<h2>Skipped inputs (1)</h2>" in page


def test_method_gt_shards_the_source_masks_exactly(tmp_path):
    """The oracle arm: each stored mask is the source's own (one stored at half size comes back
    at full size), an image without one is recorded and skipped, and a source with none at all
    is refused before anything is written."""
    import cv2
    from PIL import Image

    from maskgen.sources.synthetic import render_scene

    root, gt = tmp_path / "img", tmp_path / "gt"
    root.mkdir()
    gt.mkdir()
    masks = {}
    for i in range(4):
        rgb, mask, _ = render_scene(7, i)
        Image.fromarray(rgb).save(root / f"{i}.jpg", quality=95)
        if i == 3:
            continue  # no mask for this one
        stored = Image.fromarray(mask.astype(np.uint8) * 255)
        if i == 2:  # stored at half size: OpenCV's nearest neighbour back to the image's
            stored = stored.resize((mask.shape[1] // 2, mask.shape[0] // 2), Image.NEAREST)
            mask = cv2.resize(np.asarray(stored), mask.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
        stored.save(gt / f"{i}.png")
        masks[f"{i}.jpg"] = mask
    out = tmp_path / "out"
    assert main(["build", "--source", "folder", "--root", str(root), "--gt", str(gt), "--method", "gt",
                 "--out", str(out), "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    got = {
        s["json"]["path"]: s["mask.png"] > 127
        for s in wds.WebDataset([str(p) for p in shard_paths(out)], shardshuffle=False).decode("l8")
    }
    assert sorted(got) == sorted(masks)
    for path, mask in masks.items():
        np.testing.assert_array_equal(got[path], mask, err_msg=path)
    report = json.loads((out / "report.json").read_text())
    assert report["miou"] == 1.0 and report["n_errors"] == 1
    error = json.loads((out / "errors.jsonl").read_text())
    assert error["path"] == "3.jpg" and "no ground-truth mask" in error["detail"]

    refused = run(
        "build", "--source", "folder", "--root", str(root), "--method", "gt", "--out", str(tmp_path / "x")
    )
    assert refused.returncode != 0 and "has no ground-truth masks" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
