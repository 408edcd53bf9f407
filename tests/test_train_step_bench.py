"""benchmarks/train_step.py's "bare" step: the backbone passes a method's step made, replayed
with the same inputs and gradient modes, so ``1 - bare / step`` is the method's own overhead."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from train_step import BackbonePasses, engine_step, flops  # noqa: E402 -- a benchmark, found through sys.path

ARGS = Namespace(arch="resnet_tiny", size=32, batch=2, set=[], device="cpu", channels_last=False, amp="none")


def test_byol_step_records_two_online_passes_with_grad_and_two_target_passes_without():
    step, method = engine_step("byol", ARGS)
    step(0)
    with BackbonePasses(method) as passes:
        step(1)
    kinds = [(trunk is method.backbone, entry, grad) for trunk, entry, _, _, _, grad in passes.calls]
    assert sorted(kinds) == sorted([(True, "pooled", True)] * 2 + [(False, "pooled", False)] * 2)
    assert all(x.shape == (2, 3, 32, 32) for _, _, x, *_ in passes.calls)
    assert "pooled" not in method.backbone.__dict__  # the recording wrappers are gone afterwards


def test_replay_costs_the_backbone_forward_backward_plus_the_target_forward():
    step, method = engine_step("mocov2", ARGS)
    step(0)
    with BackbonePasses(method) as passes:
        step(1)
    replayed = flops(lambda: BackbonePasses.replay(passes.calls, None))
    x = torch.randn(2, 3, 32, 32)
    online = flops(lambda: method.backbone.pooled(x).sum().backward())  # the query: forward + backward
    with torch.no_grad():
        key = flops(lambda: method.backbone.pooled(x))  # the key: forward only
    assert replayed == pytest.approx(online + key, rel=1e-6)
    assert 0 < replayed < flops(lambda: step(2))  # the method's step also pays for its heads


def test_nested_entry_points_are_recorded_once():
    _, method = engine_step("harl", ARGS)
    with BackbonePasses(method) as passes:
        method.backbone.features(torch.randn(2, 3, 32, 32))  # ResNet's features() calls forward() inside
    assert [(entry, grad) for _, entry, *_, grad in passes.calls] == [("features", True)]
