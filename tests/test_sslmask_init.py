"""``model.init``: a training run that starts from a checkpoint's backbone instead of random weights."""

from __future__ import annotations

import pytest
import torch

from sslmask.backbones import build_backbone
from sslmask.checkpoint import CheckpointError
from sslmask.cli import main
from sslmask.config import ConfigError, load_settings
from sslmask.methods import build_method

TINY_SETS = ["model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16", "data.image_size=48"]


def _saved_trunk(arch: str, seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    trunk = build_backbone(arch)
    for buffer in trunk.buffers():  # BatchNorm statistics must come along too
        if buffer.is_floating_point():
            buffer.uniform_(0.5, 1.5)
    return trunk.state_dict()


def _assert_copies(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_init_loads_moco_v2_layout_into_online_and_momentum_backbones(tmp_path):
    state = _saved_trunk("resnet_tiny")
    # MoCo v2's layout: a DDP-wrapped query encoder with its projection head inside it
    obj = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in state.items()},
                          "module.encoder_q.fc.0.weight": torch.zeros(4, 4)}}  # fmt: skip
    torch.save(obj, tmp_path / "moco_v2.pth.tar")
    cfg = load_settings("byol", "cpu-demo", [*TINY_SETS, f"model.init={tmp_path / 'moco_v2.pth.tar'}"])
    byol = build_method(cfg, init=True)
    _assert_copies(byol.backbone, state)
    _assert_copies(byol.target_backbone, state)
    # rebuilding a finished run's method (evaluation) does not read model.init again
    fresh = build_method(cfg)
    assert not torch.equal(fresh.backbone.conv1.weight, state["conv1.weight"])


def test_init_loads_a_published_vit_layout_for_mocov3(tmp_path):
    state = _saved_trunk("vit_micro")
    obj = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in state.items()},
                          "module.base_encoder.head.0.weight": torch.zeros(4, 4)}}  # fmt: skip
    torch.save(obj, tmp_path / "mocov3.pth.tar")
    cfg = load_settings(
        "mocov3", None, [*TINY_SETS, "model.arch=vit_micro", f"model.init={tmp_path}/mocov3.pth.tar"]
    )
    method = build_method(cfg, init=True)
    _assert_copies(method.backbone, state)
    _assert_copies(method.key_backbone, state)


def test_init_that_does_not_fit_is_one_clear_error(tmp_path):
    torch.save(_saved_trunk("resnet18"), tmp_path / "r18.pt")
    cfg = load_settings("byol", "cpu-demo", [*TINY_SETS, f"model.init={tmp_path}/r18.pt"])
    with pytest.raises(CheckpointError, match=r"r18.pt: does not fit resnet_tiny"):
        build_method(cfg, init=True)
    cfg = cfg.replace("model", init=str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="missing.pt: no such checkpoint"):
        build_method(cfg, init=True)
    with pytest.raises(ConfigError, match="model.init must be str, got 3"):
        cfg.replace("model", init=3)


def test_training_starts_from_an_exported_backbone(sample_build, tmp_path, capsys):
    tiny = ["--config", "cpu-demo", "--set", "data.batch_size=8", "--set", "data.workers=0",
            *[a for s in TINY_SETS for a in ("--set", s)]]  # fmt: skip
    first = tmp_path / "first"
    assert main(["train", str(sample_build), "--method", "byol", "--out", str(first), *tiny,
                 "--set", "train.epochs=1"]) == 0  # fmt: skip
    assert main(["export", str(first), "--out", str(tmp_path / "bb.pt")]) == 0
    exported = torch.load(tmp_path / "bb.pt", weights_only=True)
    # a second run from that export, at a learning rate too small to move a weight visibly
    second = tmp_path / "second"
    assert main(["train", str(sample_build), "--method", "mocov2", "--out", str(second), *tiny,
                 "--set", "mocov2.queue=16", "--set", f"model.init={tmp_path / 'bb.pt'}",
                 "--set", "optim.lr=1e-9", "--set", "train.epochs=1"]) == 0  # fmt: skip
    weights = torch.load(second / "checkpoint.pt", weights_only=True)["method"]
    params = dict(build_backbone("resnet_tiny").named_parameters())
    for name in params:
        assert torch.allclose(weights[f"backbone.{name}"], exported[name], atol=1e-5), name
    capsys.readouterr()
    rc = main(["train", str(sample_build), "--method", "byol", "--out", str(tmp_path / "bad"), *tiny,
               "--set", f"model.init={tmp_path / 'nothing.pt'}"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "nothing.pt: no such checkpoint" in err[0]
    assert not (tmp_path / "bad").exists()  # refused before the run folder is made
