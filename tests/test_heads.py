"""Every method's heads, gathered in sslmask/heads.py (issue 45 item 5), each against the layout
of its reference code, written out here module by module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslmask.heads import DINOHead, MLPHead, mlp, moco_mlp


def _layout(module: nn.Module) -> list[tuple]:
    out = []
    for m in module:
        if isinstance(m, nn.Linear):
            out.append(("Linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.BatchNorm1d):
            out.append(("BN", m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


def test_byol_head_is_linear_bn_relu_linear():
    assert _layout(MLPHead(8, 16, 4)) == [
        ("Linear", 8, 16, True),
        ("BN", 16, True),
        ("ReLU",),
        ("Linear", 16, 4, True),
    ]


def test_moco_v2_projector_has_no_batchnorm():
    """moco/builder.py (mlp=True): Sequential(Linear(dim_mlp, dim_mlp), ReLU(), fc)."""
    assert _layout(moco_mlp(8, 16, 4)) == [("Linear", 8, 16, True), ("ReLU",), ("Linear", 16, 4, True)]


def test_moco_v3_build_mlp_and_lodisc_dropout():
    """moco-v3 builder.py _build_mlp: bias-free Linears, BN + ReLU between, last BN without affine."""
    assert _layout(mlp(8, 16, 4, layers=3, last_bn=True)) == [
        ("Linear", 8, 16, False), ("BN", 16, True), ("ReLU",),
        ("Linear", 16, 16, False), ("BN", 16, True), ("ReLU",),
        ("Linear", 16, 4, False), ("BN", 4, False),
    ]  # fmt: skip
    assert _layout(mlp(8, 16, 4, layers=2, last_bn=False, dropout=0.1)) == [
        ("Linear", 8, 16, False), ("BN", 16, True), ("ReLU",), ("Dropout",), ("Linear", 16, 4, False),
    ]  # fmt: skip


def test_dino_head_is_gelu_mlp_then_l2_norm_then_unit_prototypes():
    """dino/vision_transformer.py DINOHead (nlayers 3, no BN): the last layer's rows are unit
    vectors (weight norm with g fixed at 1 when norm_last_layer)."""
    torch.manual_seed(0)
    head = DINOHead(8, 16, 6, 10)
    assert _layout(head.mlp) == [("Linear", 8, 16, True), ("GELU",), ("Linear", 16, 16, True), ("GELU",),
                                 ("Linear", 16, 6, True)]  # fmt: skip
    g = head.last_layer.parametrizations.weight.original0
    assert torch.all(g == 1) and not g.requires_grad
    assert DINOHead(
        8, 16, 6, 10, norm_last_layer=False
    ).last_layer.parametrizations.weight.original0.requires_grad
    x = torch.randn(5, 8)
    v = head.last_layer.parametrizations.weight.original1
    expected = F.normalize(head.mlp(x), dim=-1) @ (v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)


def test_the_guides_example_method_is_the_tested_file_and_trains_two_steps(monkeypatch):
    """docs/adding-a-method.md shows docs/example_method.py's class verbatim (issue 45 item 6:
    the guide's sample had drifted from the API); registered, it takes two engine steps."""
    import importlib.util
    import sys
    from pathlib import Path

    from sslmask import engine
    from sslmask.config import load_config, parse
    from sslmask.distributed import DistInfo
    from sslmask.methods import METHODS, build_method

    docs = Path(__file__).resolve().parents[1] / "docs"
    source = (docs / "example_method.py").read_text()
    shown = source.split("# --- the guide's example begins ---\n")[1].split(
        "\n\n# --- the guide's example ends ---"
    )[0]
    assert f"```python\n{shown.strip()}\n```" in (docs / "adding-a-method.md").read_text()

    spec = importlib.util.spec_from_file_location("example_method", docs / "example_method.py")
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "example_method", example)  # dataclasses look their module up
    spec.loader.exec_module(example)
    monkeypatch.setitem(METHODS, "mine", example.MyMethod)
    shared = load_config(
        "mocov3", "cpu-demo", ["model.proj_hidden=32", "model.proj_dim=16", "data.image_size=32"]
    )
    del shared["mocov3"]
    cfg = parse({**shared, "method": "mine", "mine": {"temperature": 0.2, "mode": "a"}})
    torch.manual_seed(0)
    method = build_method(cfg)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loop = engine.build_loop(method, cfg, info, spe=10, amp="none")
    g = torch.Generator().manual_seed(0)
    before = method.key_backbone.state_dict()["conv1.weight"].clone()
    for _ in range(2):
        batch = {
            f"view{v}": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
            for v in range(2)
        }
        out = engine.train_step(loop, batch)
        assert out is not None and torch.isfinite(torch.tensor(out["loss"]))
    assert loop.step == 2 and not torch.equal(method.key_backbone.state_dict()["conv1.weight"], before)
    assert method.branch_backbone("momentum") is method.key_backbone
