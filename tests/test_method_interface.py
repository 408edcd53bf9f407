"""What every method and trunk offers the engine and the evaluations: the Backbone protocol
and ``SSLMethod.embed``, each checked against the module calls it stands for."""

from __future__ import annotations

import pytest
import torch

from sslmask.backbones import Backbone, build_backbone
from sslmask.config import load_settings
from sslmask.features import trunk_embedding
from sslmask.methods import METHODS, build_method

SMALL = ["model.proj_hidden=32", "model.proj_dim=16", "model.pred_hidden=32", "data.image_size=32"]
ARCH = {"lodisc": "vit_micro"}


@pytest.mark.parametrize(("arch", "vit"), [("resnet_tiny", False), ("vit_micro", True)])
def test_both_trunks_follow_the_backbone_protocol(arch, vit):
    trunk = build_backbone(arch, 16).eval()
    assert isinstance(trunk, Backbone) and trunk.is_vit is vit
    x = torch.randn(2, 3, 48, 64)
    pooled, grid = trunk.features(x)
    assert grid.shape == (2, trunk.num_features, 48 // trunk.out_stride, 64 // trunk.out_stride)
    torch.testing.assert_close(trunk(x), grid)
    torch.testing.assert_close(trunk.pooled(x), pooled)
    _, grids = trunk.stage_features(x, [1, 2] if vit else [3, 4])
    assert [g.shape[1] for g in grids] == trunk.stage_channels([1, 2] if vit else [3, 4])


def test_a_module_without_the_trunk_calls_is_not_a_backbone():
    assert not isinstance(torch.nn.Conv2d(3, 8, 3), Backbone)


def _method(name: str):
    arch = ARCH.get(name, "resnet_tiny")
    return build_method(load_settings(name, "cpu-demo", [*SMALL, f"model.arch={arch}"])).eval()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_embed_is_the_trunks_pooled_feature_or_grid_mean(name):
    torch.manual_seed(0)
    method = _method(name)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for branch in ("online", "momentum"):
            trunk = method.branch_backbone(branch)
            torch.testing.assert_close(method.embed(x, "backbone", branch), trunk.pooled(x))
            torch.testing.assert_close(method.embed(x, "gap", branch), trunk(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_only_methods_with_a_predictor_embed_through_it(name):
    torch.manual_seed(0)
    method = _method(name)
    x = torch.randn(3, 3, 32, 32)
    if not hasattr(method, "predictor"):
        assert "predictor" not in method.embeddings
        with pytest.raises(ValueError, match=f"a {name} run embeds as backbone, gap, not 'predictor'"):
            method.embed(x, "predictor")
        return
    assert "predictor" in method.embeddings
    with torch.no_grad():
        expected = method.predictor(method.projector(method.backbone.pooled(x)))
        torch.testing.assert_close(method.embed(x, "predictor"), expected)


def test_trunk_embedding_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match="not 'cls'"):
        trunk_embedding(build_backbone("resnet_tiny"), "cls")


def test_progress_gives_the_epoch_of_a_step_and_refuses_an_impossible_one():
    from sslmask.progress import Progress

    assert [Progress(s, 40, 10).epoch for s in (0, 9, 10, 39)] == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="not a run's progress"):
        Progress(0, 40, 0)
