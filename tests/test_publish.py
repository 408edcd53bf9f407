"""maskgen publish: card, dry-run validation, and uploads against a local Hub stand-in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hub_standin import TOKEN, start
from PIL import Image

from maskgen.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def build(tmp_path):
    out = tmp_path / "b"
    assert main(["build", "--source", "sample", "--sample-size", "9", "--no-photos", "--method", "center",
                 "--out", str(out), "--shard-size", "3", "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    return out


@pytest.fixture()
def hub():
    server, state, base = start()
    yield state, base
    server.shutdown()


def publish(out: Path, *args: str, token: str | None = TOKEN, endpoint: str | None = None, home: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO))
    if token is not None:
        env["HF_TOKEN"] = token
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    cmd = [sys.executable, "-m", "maskgen.cli", "publish", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_dry_run_stages_and_validates(build, tmp_path):
    res = publish(build, "--repo", "me/masks", "--dry-run", home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["files"][:3] == [f"data/train/maskgen-00000{i}.tar" for i in range(3)]
    assert report["card"]["license"] == "other" and report["card"]["size_categories"] == ["n<1K"]
    assert report["card"]["configs"][0]["data_files"][0]["path"] == "data/train/*.tar"
    assert report["loader"]["rows"] == 9 and {"jpg", "mask.png", "json"} <= set(report["loader"]["columns"])
    card = (build / "publish" / "README.md").read_text()
    assert card.startswith("---\n") and "## Mask quality" in card and "| 9 |" in card
    assert str(build.resolve()) not in (build / "publish" / "maskgen.json").read_text()


def test_masks_only_drops_image_bytes(build, tmp_path):
    res = publish(build, "--repo", "me/masks", "--masks-only", "--dry-run", home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    assert "jpg" not in json.loads(res.stdout)["loader"]["columns"]
    with tarfile.open(build / "publish" / "data" / "train" / "maskgen-000000.tar") as tar:
        names = tar.getnames()
    assert names and not any(n.endswith(".jpg") for n in names) and any(n.endswith(".json") for n in names)
    assert "masks-only" in (build / "publish" / "README.md").read_text()


def test_publish_creates_the_repo_and_uploads_every_file(build, hub, tmp_path):
    state, base = hub
    res = publish(
        build,
        "--repo",
        "org/masks",
        "--private",
        "--files-per-commit",
        "2",
        endpoint=base,
        home=tmp_path / "hf",
    )
    assert res.returncode == 0, res.stderr
    repo = state.repos["org/masks"]
    assert repo["private"] is True
    staged = build / "publish"
    files = repo["branches"]["main"]
    assert set(files) == {"data/train/maskgen-000000.tar", "data/train/maskgen-000001.tar",
                          "data/train/maskgen-000002.tar", "report.json", "maskgen.json", "README.md"}  # fmt: skip
    for path, entry in files.items():
        assert entry["data"] == (staged / path).read_bytes(), path
    assert len(state.commits) == 3 and all(n == 1 for n in state.puts.values())
    assert (
        state.validated and state.validated[0]["tags"][0] == "webdataset"
    )  # the card passed YAML validation
    assert TOKEN not in res.stdout + res.stderr

    again = publish(build, "--repo", "org/masks", endpoint=base, home=tmp_path / "hf")
    assert again.returncode == 0, again.stderr
    assert all(n == 1 for n in state.puts.values())  # nothing re-sent


def test_interrupted_upload_resumes_without_resending(build, hub, tmp_path):
    state, base = hub
    state.fail_put_after = 2  # the third shard's upload is refused
    res = publish(
        build, "--repo", "org/masks", "--files-per-commit", "3", endpoint=base, home=tmp_path / "hf"
    )
    assert res.returncode == 1
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("maskgen: error: uploading to org/masks failed (HTTP 403)"), res.stderr
    assert len(state.puts) == 2 and not state.commits  # two objects arrived, nothing committed yet
    state.fail_put_after = None
    res = publish(
        build, "--repo", "org/masks", "--files-per-commit", "3", endpoint=base, home=tmp_path / "hf"
    )
    assert res.returncode == 0, res.stderr
    assert len(state.puts) == 3 and all(n == 1 for n in state.puts.values())
    assert len(state.repos["org/masks"]["branches"]["main"]) == 6
    assert TOKEN not in res.stdout + res.stderr


def test_revision_branch(build, hub, tmp_path):
    state, base = hub
    res = publish(build, "--repo", "org/masks", "--revision", "v1", endpoint=base, home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    assert (
        len(state.repos["org/masks"]["branches"]["v1"]) == 6
        and not state.repos["org/masks"]["branches"]["main"]
    )


@pytest.mark.parametrize(
    ("token", "message"), [(None, "no Hugging Face token"), ("hf_wrong", "token was refused")]
)
def test_missing_or_invalid_token_is_one_line(build, hub, tmp_path, token, message):
    state, base = hub
    res = publish(build, "--repo", "org/masks", token=token, endpoint=base, home=tmp_path / "hf")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and message in lines[-1] and "Traceback" not in res.stderr
    assert not state.repos
    if token:
        assert token not in res.stderr + res.stdout


def test_a_dead_endpoint_is_one_line(build, tmp_path):
    res = publish(build, "--repo", "org/masks", endpoint="http://127.0.0.1:9", home=tmp_path / "hf")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "http://127.0.0.1:9" in lines[-1] and "refused" in lines[-1].lower()


def test_a_hub_that_echoes_the_token_never_gets_it_printed(build, hub, tmp_path):
    state, base = hub
    state.echo_token = True
    res = publish(build, "--repo", "org/masks", endpoint=base, home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    assert "as user-Bearer ***" in res.stderr
    assert TOKEN not in res.stderr + res.stdout


def test_unfinished_build_and_bad_repo_are_errors(tmp_path, capsys):
    assert main(["publish", str(tmp_path), "--repo", "org/x", "--dry-run"]) == 1
    assert "not a finished maskgen build" in capsys.readouterr().err
    assert main(["publish", str(tmp_path), "--repo", "no-slash", "--dry-run"]) == 2
    assert "expected ORG/NAME" in capsys.readouterr().err


def test_card_metadata_rules():
    from maskgen.publish.card import card_metadata, size_category

    manifest = {"source": "imagenet", "method": "drfi", "n_samples": 1_281_167}
    gated = card_metadata(manifest, "me/in1k", masks_only=False, license_id=None)
    assert gated["license"] == "other" and gated["license_name"] == "imagenet-terms-of-access"
    assert "non-commercial" in gated["extra_gated_prompt"] and gated["size_categories"] == ["1M<n<10M"]
    masks = card_metadata(manifest, "me/in1k", masks_only=True, license_id=None)
    assert "extra_gated_prompt" not in masks and masks["source_datasets"] == ["imagenet-1k"]
    assert card_metadata(manifest, "me/x", masks_only=True, license_id="cc-by-4.0")["license"] == "cc-by-4.0"
    assert [size_category(n) for n in (999, 1000, 99_999, 100_000)] == [
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "100K<n<1M",
    ]


def test_the_card_is_one_jinja_template_that_writes_values_as_given():
    """One template, one engine (issue 45): the card body comes from maskgen/templates through
    the engine report.html uses; a value that looks like a placeholder is written as given,
    every placeholder is filled, and a value the card needs but lacks is an error."""
    from maskgen.publish.card import render_card
    from maskgen.templating import template

    manifest = {"source": "folder", "n_samples": 3, "method": "drfi", "method_params": {}, "threshold": 0.5,
                "command": "maskgen build --out '{{ repo }}' ${repo}", "n_shards": 2, "class_names": ["a"]}  # fmt: skip
    card = render_card(manifest, {}, "me/masks", masks_only=True)
    assert "`maskgen build --out '{{ repo }}' ${repo}`" in card  # the command, not re-rendered
    assert "maskgen-{000000..000001}.tar" in card and "hf download me/masks" in card
    body = card.split("---\n", 2)[2]
    assert "{{" not in body.replace("'{{ repo }}'", "") and card.endswith("\n")
    with pytest.raises(Exception, match="'pretty_name' is undefined"):
        template("dataset_card.md").render({})
    package = Path(__file__).resolve().parents[1] / "maskgen"
    assert (
        not list((package / "publish").glob("*.md"))
        and "string.Template" not in (package / "publish" / "card.py").read_text()
    )


@pytest.mark.parametrize(
    "mode",
    ["warning", "zero_width", "whoami_list", "repo_url", "combining", "filler", "nested_name", "percent_url"],
)
def test_a_hostile_hub_never_gets_the_token_printed(build, hub, tmp_path, mode):
    """Issue 35 item 1: an X-HF-Warning header with the token (logged by huggingface_hub itself),
    a create_repo URL holding it (an HfUriError traceback), a whoami JSON list (an AttributeError
    traceback) and a token with a zero-width space inside all got past the scrubber; issue 47
    item 5: a combining or filler character inside, a nested name printed as a repr, and a
    percent-encoded URL got past the next one."""
    from maskio.hubtoken import visible_text

    state, base = hub
    state.hostile = mode
    res = publish(build, "--repo", "org/masks", endpoint=base, home=tmp_path / "hf")
    printed = res.stderr + res.stdout
    assert TOKEN not in printed and TOKEN not in visible_text(printed), printed
    assert "Traceback" not in printed
    if mode in ("warning", "zero_width", "combining", "filler", "nested_name", "percent_url"):
        assert res.returncode == 0, res.stderr
        assert "***" in printed or mode == "nested_name"  # said, scrubbed (a nested name is not said)
    else:
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and lines[-1].startswith("maskgen: error:"), res.stderr


def hub_cli(tool: str, *args: str, home: Path, endpoint: str, offline: bool = False):
    """``sslmask``/``maskgen`` in a fresh process that sees the stand-in as the Hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(REPO),
               HF_TOKEN=TOKEN, HF_ENDPOINT=endpoint, **({"HF_HUB_OFFLINE": "1"} if offline else {}))  # fmt: skip
    return subprocess.run([sys.executable, "-m", f"{tool}.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)  # fmt: skip


def masks_by_key(tars) -> dict[str, bytes]:
    from maskio.shard_format import iter_tar_samples

    return {key: fields["mask.png"] for tar in tars for key, fields in iter_tar_samples(tar)}


def test_round_trip_publish_masks_only_download_and_train_with_your_images(hub, tmp_path):
    """build -> publish --masks-only -> hf:// and snapshot folder -> train with --images: the same
    samples, byte-identical masks, and the weights of training on the local full-image build."""
    import torch
    from conftest import tiny_train_args
    from test_masks_only import write_tree

    from maskio.shard_format import shard_paths
    from sslmask.cli import main as sslmask_main

    state, base = hub
    root = write_tree(tmp_path / "images")
    local = tmp_path / "local"
    assert main(["build", "--source", "folder", "--root", str(root), "--class-folders", "--method", "center",
                 "--shard-size", "6", "--out", str(local), "--executor", "local", "--no-progress"]) == 0  # fmt: skip
    home = tmp_path / "hf"
    res = publish(local, "--repo", "org/in-masks", "--masks-only", endpoint=base, home=home)
    assert res.returncode == 0, res.stderr

    res = hub_cli("sslmask", "inspect", "hf://datasets/org/in-masks", "--images", str(root), home=home,
                  endpoint=base)  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["samples"] == 16 and summary["images_joined"] == 16
    assert summary["published"][0]["method"] == "center" and summary["published"][0]["classes"] == 2
    snapshot = next((home / "hub" / "datasets--org--in-masks" / "snapshots").iterdir())
    tars = sorted(snapshot.glob("data/train/*.tar"))
    assert masks_by_key(tars) == masks_by_key(shard_paths(local))  # same samples, byte-identical masks

    sets = ["train.epochs=2", "train.deterministic=true", "data.batch_size=4"]
    assert sslmask_main(tiny_train_args("harl", local, tmp_path / "a", *sets)) == 0
    res = hub_cli("sslmask", *tiny_train_args("harl", "hf://datasets/org/in-masks", tmp_path / "b", *sets),
                  "--images", str(root), home=home, endpoint=base)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (
        sslmask_main([*tiny_train_args("harl", snapshot, tmp_path / "c", *sets), "--images", str(root)]) == 0
    )
    weights = [torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["method"] for r in "abc"]
    assert all(torch.equal(weights[0][k], w[k]) for w in weights[1:] for k in weights[0])

    # mask quality of the published dataset against ground truth = the local build's
    gt = tmp_path / "gt"
    for image in root.rglob("*.jpg"):
        target = gt / image.relative_to(root).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        h, w = Image.open(image).size[::-1]
        Image.fromarray(
            ((np.arange(w)[None, :] > w // 3) & (np.arange(h)[:, None] > h // 4)).astype(np.uint8) * 255
        ).save(target)
    scores = []
    for out in (str(local), "hf://datasets/org/in-masks"):
        res = hub_cli("maskgen", "eval", out, "--gt", str(gt), home=home, endpoint=base)
        assert res.returncode == 0, res.stderr
        scores.append(res.stdout.strip())
    assert scores[0] == scores[1] and "n_with_gt=16" in scores[0]
    res = hub_cli("maskgen", "eval", "hf://datasets/org/in-masks", home=home, endpoint=base)
    assert res.returncode != 0 and "give --gt DIR" in res.stderr

    # offline from the cache; and one line for a revision, a repo or (offline) a download it lacks
    res = hub_cli("sslmask", "inspect", "hf://datasets/org/in-masks", home=home, endpoint=base, offline=True)
    assert res.returncode == 0 and json.loads(res.stdout)["samples"] == 16, res.stderr
    for spec, message, offline in [
        ("hf://datasets/org/in-masks@v9", "no revision 'v9'", False),
        ("hf://datasets/org/nothing", "no such dataset repo", False),
        ("hf://datasets/org/nothing", "not in the local Hugging Face cache", True),
        ("hf://datasets/not-a-repo", "expected hf://datasets/OWNER/NAME", False),
    ]:
        res = hub_cli("sslmask", "inspect", spec, home=home, endpoint=base, offline=offline)
        assert res.returncode != 0 and message in res.stderr, (spec, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and TOKEN not in res.stderr, res.stderr
