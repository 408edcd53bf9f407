"""Schedules at their end points; LARS against a hand-written update; parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sslmask.optim import LARS, build_optimizer, param_groups
from sslmask.schedules import cosine_ramp, warmup_cosine


def test_cosine_ramp_end_points_and_monotone():
    assert cosine_ramp(0.996, 0, 1000) == pytest.approx(0.996)
    assert cosine_ramp(0.996, 1000, 1000) == pytest.approx(1.0)
    assert cosine_ramp(0.7, 500, 1000) == pytest.approx(0.85)
    values = [cosine_ramp(0.7, k, 100) for k in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert cosine_ramp(0.7, 2000, 1000) == pytest.approx(1.0)  # clamped past the end


def test_warmup_cosine_end_points():
    assert warmup_cosine(1.0, 0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(1.0, 9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(1.0, 10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(1.0, 100, 100, 10, final=0.01) == pytest.approx(0.01)
    assert warmup_cosine(1.0, 55, 100, 10) == pytest.approx(0.5)


def test_param_groups_keep_biases_and_norms_apart():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    decay, rest = param_groups([model], 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4]), torch.Size([2, 3])]
    assert len(rest["params"]) == 4 and rest["weight_decay"] == 0 and rest["exclude"]


def test_lars_step_matches_manual_update():
    torch.manual_seed(0)
    w, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    gw, gb = torch.randn(5, 3), torch.randn(5)
    lr, wd, m, eta = 0.5, 0.01, 0.9, 0.001
    opt = LARS([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0, "exclude": True}],
               lr=lr, weight_decay=wd, momentum=m, eta=eta)  # fmt: skip
    w0, b0 = w.detach().clone(), b.detach().clone()
    vw = vb = None
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        # manual: decayed weight gradient scaled by the trust ratio; bias: plain momentum SGD
        wc = w.detach()
        d = gw + wd * wc
        d = d * (eta * wc.norm() / d.norm())
        vw = d if vw is None else m * vw + d
        vb = gb if vb is None else m * vb + gb
        expected_w, expected_b = wc - lr * vw, b.detach() - lr * vb
        opt.step()
        torch.testing.assert_close(w.detach(), expected_w)
        torch.testing.assert_close(b.detach(), expected_b)
    assert not torch.equal(w0, w.detach()) and not torch.equal(b0, b.detach())


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer(name):
    model = nn.Linear(3, 2)
    opt = build_optimizer(name, param_groups([model], 1e-4), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", param_groups([model], 0.0), 0.1)
