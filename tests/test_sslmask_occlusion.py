"""Occlusion robustness (SegAS's protocol): the occlusions, and the evaluation end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from maskio.records import index_any
from sslmask.backbones import build_backbone, normalize
from sslmask.dataset import EvalDataset
from sslmask.eval.occlusion import (
    attention_keep,
    conditions,
    occluded_features,
    occlusion_eval,
    random_grid_keep,
    saliency_keep,
)

LOADER = {"batch_size": 8, "workers": 0, "device": "cpu"}


def test_random_grid_hides_round_ratio_cells_seeded_by_the_image_index():
    keep = random_grid_keep(torch.tensor([3, 9, 3]), (28, 28), 0.5, 7, seed=0)
    cells = keep[:, 0, 2::4, 2::4]  # one pixel per 4 x 4 cell
    assert cells.shape == (3, 7, 7) and ((cells == 0).flatten(1).sum(1) == round(0.5 * 49)).all()
    assert torch.equal(keep, F.interpolate(cells[:, None], size=(28, 28), mode="nearest"))
    assert torch.equal(keep[0], keep[2]) and not torch.equal(keep[0], keep[1])  # by index, not by position
    assert not torch.equal(keep[0], random_grid_keep(torch.tensor([3]), (28, 28), 0.5, 7, seed=1)[0])
    assert random_grid_keep(torch.tensor([0]), (14, 14), 0.0, 7, 0).all()


def test_attention_and_saliency_keep_hide_what_they_name():
    heat = torch.tensor([[[[0.1, 0.5], [0.9, 1.0]]]])
    assert attention_keep(heat, 0.5).flatten().tolist() == [1, 1, 0, 0]
    assert attention_keep(heat, 1.0).all()
    mask = torch.tensor([[[[0.0, 0.6], [1.0, 0.2]]]])
    assert saliency_keep(mask, "foreground").flatten().tolist() == [1, 0, 0, 1]
    assert saliency_keep(mask, "background").flatten().tolist() == [0, 1, 1, 0]


def test_occluded_features_embed_the_occluded_crops_in_record_order(sample_build):
    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny").eval()
    records = index_any([str(sample_build)])
    feats, _ = occluded_features(
        backbone, records, 32, lambda x, m, i: saliency_keep(m, "background"), True, LOADER
    )
    ds = EvalDataset(records, 32, masks=True)
    with torch.no_grad():
        for index in (0, 9, len(records) - 1):  # crosses batches of 8
            image, _, mask = ds[index]
            x = normalize(image[None])
            want = backbone.pooled(x * (mask[None].float() / 255 > 0.5).float())
            torch.testing.assert_close(feats[index : index + 1], want, rtol=1e-4, atol=1e-5)


def test_occlusion_eval_is_clean_where_nothing_is_hidden(sample_build):
    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny")
    records = index_any([str(sample_build)])
    plan = conditions(backbone, ratios=(0.0, 0.5), thetas=(0.5, 1.0), grid=7, seed=0, saliency=True)
    result = occlusion_eval(backbone, records, records, 32, plan, LOADER)
    assert set(result) == {"clean", "random", "attention", "saliency"}
    assert result["random"]["0"] == result["attention"]["1"] == result["clean"]
    assert set(result["saliency"]) == {"foreground", "background"}
    assert all(0 <= v <= 100 for fam in ("random", "attention", "saliency") for v in result[fam].values())


def test_occlusion_cli_writes_json_and_skips_saliency_without_masks(sample_build, tmp_path, capsys):
    from PIL import Image

    from sslmask.cli import main

    out = tmp_path / "occ.json"
    args = ["eval", "occlusion", "--checkpoint", "random", "--arch", "resnet_tiny", "--image-size", "32",
            "--workers", "0", "--ratios", "0.5", "--thetas", "0.6"]  # fmt: skip
    torch.manual_seed(1234)  # whatever the caller's generator holds, `random` is one network
    assert main([*args, "--train", str(sample_build), "--val", str(sample_build), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["eval"] == "occlusion" and set(result["top1"]["saliency"]) == {"foreground", "background"}
    linear = tmp_path / "linear.json"
    assert main(["eval", "linear", "--checkpoint", "random", "--arch", "resnet_tiny", "--image-size", "32",
                 "--workers", "0", "--train", str(sample_build), "--val", str(sample_build),
                 "--out", str(linear)]) == 0  # fmt: skip
    assert result["probe"] == "segas"  # SegAS's own probe schedule by default
    cosine = tmp_path / "cosine.json"
    assert main([*args, "--train", str(sample_build), "--val", str(sample_build), "--probe", "cosine",
                 "--out", str(cosine)]) == 0  # fmt: skip
    assert (
        json.loads(cosine.read_text())["top1"]["clean"] == json.loads(linear.read_text())["accuracy"]["top1"]
    )
    assert set(result["top1"]["random"]) == {"0.5"} and set(result["top1"]["attention"]) == {"0.6"}
    folder = tmp_path / "folders"
    for c in range(2):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 36), (60 * i, 120 * c, 90)).save(folder / f"c{c}" / f"{i}.png")
    capsys.readouterr()
    assert main([*args, "--train", str(folder), "--val", str(folder)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"]["saliency"].startswith("skipped")


@pytest.mark.parametrize("bad", [["--ratios", "1.5"], ["--grid", "0"]])
def test_occlusion_cli_refuses_bad_values_in_one_line(bad, sample_build, capsys):
    from sslmask.cli import main

    args = ["eval", "occlusion", "--checkpoint", "random", "--arch", "resnet_tiny", "--train", str(sample_build),
            "--val", str(sample_build), *bad]  # fmt: skip
    assert main(args) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_every_evaluation_of_random_scores_the_same_network():
    from sslmask.cli import _scored_backbone

    torch.manual_seed(1)
    first, _ = _scored_backbone("random", "resnet_tiny", "auto")
    torch.manual_seed(2)
    second, _ = _scored_backbone("random", "resnet_tiny", "auto")
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_ssl_compare_reports_the_occlusion_probes_own_clean_top1(sample_build):
    # the occluded columns of benchmarks/ssl_compare.py are read against the clean top-1 of the
    # same probe (SegAS's schedule), not against `eval linear`'s, whose schedule differs
    import argparse
    import sys
    from pathlib import Path

    from sslmask.checkpoint import load_backbone

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from ssl_compare import EXTRA_COLUMNS, segas_evaluations

    build = [str(sample_build)]
    args = argparse.Namespace(occlusion=True, bank=None, train=build, val=build, image_size=32, loc_val=None)
    row = segas_evaluations("random", "resnet_tiny", args, seed=3)
    assert set(row) == {"occ_clean", "occ_rand50", "occ_fg", "occ_bg"} <= set(EXTRA_COLUMNS)
    torch.manual_seed(3)
    backbone = load_backbone("random", "resnet_tiny")
    plan = conditions(backbone, (0.5,), (), 7, 3, saliency=True)
    plan.pop("attention")
    records = index_any(build)
    want = occlusion_eval(backbone, records, records, 32, plan, LOADER)
    assert row["occ_clean"] == want["clean"] and row["occ_rand50"] == want["random"]["0.5"]
    assert (row["occ_fg"], row["occ_bg"]) == (want["saliency"]["foreground"], want["saliency"]["background"])
