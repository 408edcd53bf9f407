"""k-NN against a slow reference, the linear probe, export/import of backbones."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torchvision

from sslmask.backbones import build_backbone
from sslmask.checkpoint import CheckpointError, infer_arch, load_backbone, save_atomic
from sslmask.config import load_settings
from sslmask.eval.knn import knn_eval, knn_predict
from sslmask.eval.linear import linear_probe
from sslmask.export import export_backbone
from sslmask.methods import build_method


def _slow_knn(bank, labels, queries, k, t, num_classes):
    preds = []
    for q in queries.tolist():
        sims = []
        for j, b in enumerate(bank.tolist()):
            dot = sum(x * y for x, y in zip(q, b, strict=True))
            sims.append((dot / (math.sqrt(sum(x * x for x in q)) * math.sqrt(sum(y * y for y in b))), j))
        votes = [0.0] * num_classes
        for s, j in sorted(sims, reverse=True)[:k]:
            votes[int(labels[j])] += math.exp(s / t)
        preds.append(votes)
    return torch.tensor(preds)


def test_weighted_knn_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(60, 5, generator=g), torch.randn(9, 5, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    fast = knn_predict(bank, labels, queries, k=7, temperature=0.07, num_classes=4, chunk=4)
    torch.testing.assert_close(fast, _slow_knn(bank, labels, queries, 7, 0.07, 4), rtol=1e-4, atol=1e-3)


def test_knn_and_linear_probe_on_separable_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 16, generator=g) * 4
    ytr, yva = torch.arange(90) % 3, torch.arange(30) % 3
    ftr = centres[ytr] + torch.randn(90, 16, generator=g)
    fva = centres[yva] + torch.randn(30, 16, generator=g)
    assert knn_eval(ftr, ytr, fva, yva)["k=20"]["top1"] == 100.0
    result = linear_probe(ftr, ytr, fva, yva, epochs=30, lr=0.1, batch_size=32)
    assert result["top1"] == 100.0 and result["top5"] == 100.0
    noise = linear_probe(
        torch.randn(90, 16, generator=g), ytr, torch.randn(30, 16, generator=g), yva, epochs=30
    )
    assert noise["top1"] < 70.0


def _fake_run(tmp_path, arch="resnet18"):
    cfg = load_settings("byol", None, [f"model.arch={arch}", "model.proj_hidden=32", "model.pred_hidden=32"])
    torch.manual_seed(0)
    method = build_method(cfg)
    run = tmp_path / "run"
    run.mkdir()
    save_atomic({"method": method.state_dict(), "step": 7, "config": cfg.to_config()}, run / "checkpoint.pt")
    return run, method


def test_export_loads_into_torchvision_resnet(tmp_path):
    run, method = _fake_run(tmp_path)
    info = export_backbone(run, tmp_path / "backbone.pt")
    assert info["step"] == 7
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    tv = torchvision.models.resnet18()
    result = tv.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.eval()
    method.backbone.eval()
    x = torch.randn(2, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(tv.children())[:-2])
    torch.testing.assert_close(trunk(x), method.backbone(x))
    assert infer_arch(state) == ("resnet18", 32)
    loaded = load_backbone(str(tmp_path / "backbone.pt")).eval()
    torch.testing.assert_close(loaded(x), method.backbone(x))
    from_run = load_backbone(str(run)).eval()
    torch.testing.assert_close(from_run(x), method.backbone(x))


def test_torchvision_checkpoint_with_classifier_loads(tmp_path):
    tv = torchvision.models.resnet50()
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, tmp_path / "tv.pth")
    backbone = load_backbone(str(tmp_path / "tv.pth")).eval()
    tv.eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(backbone(x), torch.nn.Sequential(*list(tv.children())[:-2])(x))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    run, _ = _fake_run(tmp_path)
    with pytest.raises(CheckpointError, match="does not fit resnet34"):
        load_backbone(str(run), arch="resnet34")

    # an arbitrary pickled object: weights_only loading refuses to build it
    torch.save(argparse.Namespace(cmd="echo pwned"), tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: not a loadable checkpoint"):
        load_backbone(str(tmp_path / "evil.pt"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_backbone(str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="needs --arch"):
        load_backbone("random")


def test_output_stride_16_doubles_the_grid():
    x = torch.randn(1, 3, 64, 64)
    assert build_backbone("resnet_tiny", 32)(x).shape == (1, 128, 2, 2)
    assert build_backbone("resnet_tiny", 16)(x).shape == (1, 128, 4, 4)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit_b16")


def _formats(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    """The same trunk as the checkpoint layouts of the codebases users bring."""
    mlp = {"fc.0.weight": torch.zeros(8, 512), "fc.2.weight": torch.zeros(4, 8)}
    return {
        "torchvision": {**sd, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)},
        "mocov2": {
            "state_dict": {
                **{f"module.encoder_q.{k}": v for k, v in sd.items()},
                **{f"module.encoder_q.{k}": v for k, v in mlp.items()},
                **{f"module.encoder_k.{k}": v + 1 for k, v in sd.items()},
                "module.queue": torch.zeros(4, 16),
            }
        },  # fmt: skip
        "mocov3": {
            "state_dict": {
                **{f"module.base_encoder.{k}": v for k, v in sd.items()},
                **{f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()},
                "module.predictor.0.weight": torch.zeros(4, 4),
            }
        },  # fmt: skip
        "dino": {
            "teacher": {
                **{f"backbone.{k}": v for k, v in sd.items()},
                "head.mlp.0.weight": torch.zeros(2, 2),
            },
            "student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()},
            "epoch": 100,
        },  # fmt: skip
        "solo-learn": {
            "state_dict": {
                **{f"backbone.{k}": v for k, v in sd.items()},
                **{f"momentum_backbone.{k}": v + 1 for k, v in sd.items()},
                "projector.0.weight": torch.zeros(4, 4),
            }
        },  # fmt: skip
    }


@pytest.mark.parametrize(
    "fmt", ["torchvision", "mocov2", "mocov3", "dino", "solo-learn", "safetensors", "export"]
)
def test_common_checkpoint_formats_load_the_same_weights(tmp_path, fmt):
    torch.manual_seed(0)
    reference = build_backbone("resnet18").eval()
    sd = reference.state_dict()
    path = tmp_path / f"{fmt}.pt"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "backbone.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "export":
        run, method = _fake_run(tmp_path)
        path = tmp_path / "exported.safetensors"
        export_backbone(run, path)
        reference = method.backbone.eval()
        sd = reference.state_dict()
    else:
        torch.save(_formats(sd)[fmt], path)
    loaded = load_backbone(str(path)).eval()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_a_checkpoint_without_a_known_trunk_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {"encoder.layer.0.weight": torch.zeros(2)}}, tmp_path / "bert.pt")
    with pytest.raises(CheckpointError, match="bert.pt: no ResNet or ViT trunk found"):
        load_backbone(str(tmp_path / "bert.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors: not a loadable safetensors file"):
        load_backbone(str(tmp_path / "bad.safetensors"))
