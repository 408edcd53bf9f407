"""ViT backbones (timm's): the trunk interface, attention maps, checkpoints in and out, and
ViTs through training, k-NN and the deep saliency head."""

from __future__ import annotations

import math

import pytest
import torch

from sslmask.backbones import build_backbone
from sslmask.checkpoint import CheckpointError, backbone_state, infer_arch, load_backbone
from sslmask.optim import param_groups


def test_vit_gives_cls_grid_and_pooled_from_any_multiple_of_16():
    torch.manual_seed(0)
    vit = build_backbone("vit_micro").eval()
    x = torch.randn(2, 3, 32, 48)
    cls, grid = vit.features(x)
    assert cls.shape == (2, 48) and grid.shape == (2, 48, 2, 3) and vit.num_features == 48
    tokens = vit.forward_features(x)
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, 1 + 1 * 3 + 2])  # row-major patches
    torch.testing.assert_close(vit.pooled(x), cls)
    assert vit(torch.randn(1, 3, 96, 96)).shape == (1, 48, 6, 6)


def test_attention_maps_equal_a_slow_computation_and_cost_the_normal_forward_nothing():
    torch.manual_seed(0)
    vit = build_backbone("vit_micro").eval()
    x = torch.randn(1, 3, 32, 32)
    maps = vit.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (1, 5, 5)
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(1, 5))
    # block 0 by hand: tokens -> norm1 -> qkv -> per-head softmax(q k^T / sqrt(d)) -> head mean
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        blk = vit.blocks[0]
        qkv = blk.attn.qkv(blk.norm1(t))[0].view(5, 3, 3, 16)  # tokens, q/k/v, heads, head dim
        heads = []
        for h in range(3):
            q, k = qkv[:, 0, h], qkv[:, 1, h]
            logits = [
                [sum(q[i, d] * k[j, d] for d in range(16)) / math.sqrt(16) for j in range(5)]
                for i in range(5)
            ]
            heads.append(torch.tensor(logits).softmax(-1))
    torch.testing.assert_close(maps[0][0], torch.stack(heads).mean(0), rtol=1e-4, atol=1e-5)
    assert all(b.attn.fused_attn == vit.blocks[0].attn.fused_attn for b in vit.blocks)
    assert not any(b.attn.attn_drop._forward_hooks for b in vit.blocks)  # no hooks left behind


def test_weight_decay_exclusion_rules_on_a_vit():
    """Each rule, its split written out: bias_norm (DINO's get_params_groups: biases and 1-D
    tensors; pos_embed and cls_token are 3-D, so decayed), bias_norm_tokens (also timm's
    no_weight_decay()), none (MoCo v3 / LoDisc AdamW over model.parameters())."""
    vit = build_backbone("vit_micro")
    names = {id(p): n for n, p in vit.named_parameters()}

    def split(rule):
        decay, rest = param_groups([vit], 0.1, rule)
        return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in rest["params"]}

    one_d = {n for n, p in vit.named_parameters() if p.ndim <= 1}
    decay, rest = split("bias_norm")
    assert rest == one_d and {"cls_token", "pos_embed", "blocks.0.attn.qkv.weight"} <= decay
    decay, rest = split("bias_norm_tokens")
    assert rest == one_d | {"cls_token", "pos_embed"}
    decay, rest = split("none")
    assert rest == set() and decay == set(names.values())
    with pytest.raises(ValueError, match="decay_exclude"):
        param_groups([vit], 0.1, "auto")  # auto is resolved by the engine, never passed down


def test_export_loads_into_timm_and_published_layouts_load_here(tmp_path):
    timm = pytest.importorskip("timm")
    from sslmask.export import export_backbone

    torch.manual_seed(0)
    vit = build_backbone("vit_tiny")
    state = vit.state_dict()
    run_ckpt = {"method": {f"backbone.{k}": v for k, v in state.items()}, "step": 3,
                "config": {"model": {"arch": "vit_tiny", "out_stride": 32}}}  # fmt: skip
    torch.save(run_ckpt, tmp_path / "checkpoint.pt")
    export_backbone(tmp_path, tmp_path / "vit.pt")
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    result = reference.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    # DINO's layout (teacher/student, backbone. prefix, its head beside) and MoCo v3's
    layouts = {
        "dino": {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "head.mlp.0.weight": torch.zeros(2, 2)}},
        "mocov3": {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in state.items()},
                                  "module.base_encoder.head.0.weight": torch.zeros(2, 2)}},
    }  # fmt: skip
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        assert infer_arch(backbone_state(obj)) == ("vit_tiny", 16)
        loaded = load_backbone(str(tmp_path / f"{name}.pth"))
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
    with pytest.raises(CheckpointError, match="matches no known arch"):
        infer_arch({"cls_token": torch.zeros(1, 1, 100), "blocks.0.norm1.weight": torch.zeros(100)})


@pytest.mark.parametrize("method", ["mocov3", "dino", "harl"])
def test_training_a_vit_and_its_knn(method, sample_build, tmp_path, capsys):
    from sslmask.cli import main

    run = tmp_path / method
    extra = {"dino": ["--set", "dino.out_dim=32", "--set", "dino.local_crops=2", "--set", "dino.local_size=16"],
             "mocov3": [], "harl": []}[method]  # fmt: skip
    args = ["train", str(sample_build), "--method", method, "--out", str(run), "--config", "cpu-demo",
            "--set", "model.arch=vit_micro", "--set", "data.image_size=32", "--set", "data.batch_size=8",
            "--set", "data.workers=0", "--set", "model.proj_hidden=32", "--set", "model.pred_hidden=32",
            "--set", "model.proj_dim=16", "--set", "train.epochs=1", "--set", "optim.name=adamw",
            "--set", "optim.lr=1.0e-3", "--set", "optim.weight_decay=0.05", *extra]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(run), "--train", str(sample_build), "--val", str(sample_build),
                 "--image-size", "32", "--workers", "0"]) == 0  # fmt: skip
    assert '"k=20"' in capsys.readouterr().out


def test_deep_head_on_a_vit_patch_grid(sample_build, tmp_path):
    from maskgen.cli import main

    head = tmp_path / "vit-head.safetensors"
    assert main(["deep", "fit", "--shards", str(sample_build), "--backbone", "random", "--arch", "vit_micro",
                 "--out", str(head), "--epochs", "1", "--short-side", "32", "--finetune", "all", "--batch-size", "8",
                 "--workers", "0"]) == 0  # fmt: skip
    out = tmp_path / "build"
    assert main(["build", "--source", "sample", "--sample-size", "4", "--no-photos", "--method", "deep",
                 "--head", str(head), "--out", str(out), "--executor", "local", "--no-progress"]) == 0  # fmt: skip
