"""HARL/BYOL losses against independent per-sample computations."""

from __future__ import annotations

import math

import pytest
import torch

from sslmask.config import load_settings
from sslmask.losses import embedding_std, harl_hybrid_loss, harl_mask_loss, regression_loss
from sslmask.methods import build_method
from sslmask.progress import Progress


def _slow_l2_normalized(p, z):
    """||p/|p| - z/|z|||^2, one sample at a time in plain Python."""
    out = []
    for a, b in zip(p.tolist(), z.tolist(), strict=True):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        out.append(sum((x / na - y / nb) ** 2 for x, y in zip(a, b, strict=True)))
    return torch.tensor(out)


def test_regression_loss_is_normalized_mse():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.testing.assert_close(regression_loss(p, z), _slow_l2_normalized(p, z), rtol=1e-5, atol=1e-5)
    assert regression_loss(p, 3 * p).abs().max() < 1e-5


def test_harl_mask_and_hybrid_loss_per_sample():
    g = torch.Generator().manual_seed(1)
    pf, zf, pb, zb, pg, zg = (torch.randn(4, 6, generator=g) for _ in range(6))
    alpha, lam = 0.7, 0.6
    mask, fg, bg = harl_mask_loss(pf, zf, pb, zb, alpha)
    ref_fg, ref_bg, ref_g = (
        _slow_l2_normalized(pf, zf),
        _slow_l2_normalized(pb, zb),
        _slow_l2_normalized(pg, zg),
    )
    ref_mask = [alpha * f + (1 - alpha) * b for f, b in zip(ref_fg.tolist(), ref_bg.tolist(), strict=True)]
    torch.testing.assert_close(mask, torch.tensor(ref_mask), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fg, ref_fg, rtol=1e-5, atol=1e-5)
    hybrid = harl_hybrid_loss(mask, regression_loss(pg, zg), lam)
    ref = [lam * m + (1 - lam) * x for m, x in zip(ref_mask, ref_g.tolist(), strict=True)]
    torch.testing.assert_close(hybrid, torch.tensor(ref), rtol=1e-5, atol=1e-5)


def test_collapse_monitor():
    assert embedding_std(torch.ones(8, 16)) < 1e-6
    spread = embedding_std(torch.randn(4096, 16, generator=torch.Generator().manual_seed(0)))
    assert spread == pytest.approx(1 / math.sqrt(16), rel=0.05)


def _tiny_cfg(method: str, **harl):
    sets = [f"harl.{key}={value}" for key, value in harl.items()] if method == "harl" else []
    return load_settings(
        method, "cpu-demo", ["model.proj_hidden=32", "model.pred_hidden=32", "model.proj_dim=16", *sets]
    )


def _batch(masks=None, n=4, size=64):
    g = torch.Generator().manual_seed(3)
    batch = {
        "view0": torch.randn(n, 3, size, size, generator=g),
        "view1": torch.randn(n, 3, size, size, generator=g),
    }
    for v in range(2):
        batch[f"mask{v}"] = masks[v] if masks is not None else torch.ones(n, 1, size, size)
    return batch


def test_harl_object_term_with_full_masks_equals_byol():
    """All-ones masks, background weight 0, object term only: HARL's loss is BYOL's."""
    torch.manual_seed(0)
    byol = build_method(_tiny_cfg("byol"))
    harl = build_method(
        _tiny_cfg("harl", alpha_base=1.0, alpha_schedule="fixed", loss="mask", fallback_max=1.0)
    )
    harl.load_state_dict(byol.state_dict())
    batch = _batch()
    torch.testing.assert_close(
        harl(batch, Progress(0, 10, 10))["loss"],
        byol(batch, Progress(0, 10, 10))["loss"],
        rtol=1e-5,
        atol=1e-6,
    )


def _manual_pool(fmap: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """fg/bg/global vectors of one sample, written out: area weights per cell, MAP, GAP."""
    h, w = fmap.shape[-2:]
    H, W = mask.shape[-2:]
    cell = torch.tensor([[mask[0, r * H // h : (r + 1) * H // h, c * W // w : (c + 1) * W // w].mean()
                          for c in range(w)] for r in range(h)])  # fmt: skip
    fg = (fmap * cell).sum((1, 2)) / (cell.sum() + 1e-6) if cell.sum() >= 1e-3 else fmap.mean((1, 2))
    bg = (fmap * (1 - cell)).sum((1, 2)) / ((1 - cell).sum() + 1e-6)
    return [fg, bg, fmap.mean((1, 2))]


def test_harl_forward_matches_manual_per_sample_computation():
    torch.manual_seed(0)
    harl = build_method(_tiny_cfg("harl", alpha_schedule="fixed", lambda_schedule="fixed"))
    n, size = 4, 64
    masks = []
    for v in range(2):
        m = torch.zeros(n, 1, size, size)
        m[:, :, 8 + 8 * v : 40, 16:56] = 1
        masks.append(m)
    masks[0][3] = 0  # an empty mask: that sample falls back to the global term
    batch = _batch(masks, n, size)
    out = harl(batch, Progress(0, 10, 10))

    alpha, lam = 0.7, 0.7
    with torch.no_grad():
        pooled_online, pooled_target = [], []
        for v in range(2):
            fo, ft = harl.backbone(batch[f"view{v}"]), harl.target_backbone(batch[f"view{v}"])
            pooled_online.append(
                [
                    torch.stack(t)
                    for t in zip(*[_manual_pool(fo[i], masks[v][i]) for i in range(n)], strict=True)
                ]
            )
            pooled_target.append(
                [
                    torch.stack(t)
                    for t in zip(*[_manual_pool(ft[i], masks[v][i]) for i in range(n)], strict=True)
                ]
            )
        # the heads use batch statistics: each kind (fg/bg/global) goes through them as one batch
        p = [[harl.predictor(harl.projector(x)) for x in pooled_online[v]] for v in range(2)]
        z = [[harl.target_projector(x) for x in pooled_target[v]] for v in range(2)]
    total = 0.0
    for a, b in ((0, 1), (1, 0)):
        terms = [_slow_l2_normalized(p[a][k], z[b][k]) for k in range(3)]
        per_sample = []
        for i in range(n):
            if all(0.01 <= float(masks[v][i].mean()) <= 0.99 for v in range(2)):
                mask_term = alpha * terms[0][i] + (1 - alpha) * terms[1][i]
                per_sample.append(lam * mask_term + (1 - lam) * terms[2][i])
            else:
                per_sample.append(terms[2][i])
        total += sum(per_sample) / n
    torch.testing.assert_close(out["loss"].detach(), torch.tensor(float(total)), rtol=1e-4, atol=1e-5)
    assert out["fallback"] == pytest.approx(0.25)


def test_harl_coefficient_schedules_end_points():
    harl = build_method(_tiny_cfg("harl", alpha_base=0.7, lambda_base=0.6))
    assert harl.coefficients(0, 100) == pytest.approx((0.7, 0.6))
    assert harl.coefficients(100, 100) == pytest.approx((1.0, 1.0))
    fixed = build_method(_tiny_cfg("harl", alpha_schedule="fixed", loss="mask"))
    assert fixed.coefficients(50, 100) == pytest.approx((0.7, 1.0))
