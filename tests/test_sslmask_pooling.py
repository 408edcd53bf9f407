"""Mask downsampling modes and masked average pooling on hand-made masks."""

from __future__ import annotations

import pytest
import torch

from sslmask.pooling import downsample_mask, masked_average_pool


def _mask():
    """8x8 mask: the top-left 4x4 cell block full, one pixel in the top-right block."""
    m = torch.zeros(1, 1, 8, 8)
    m[..., :4, :4] = 1
    m[..., 0, 7] = 1
    return m


def test_soft_area_is_the_foreground_fraction_per_cell():
    out = downsample_mask(_mask(), (2, 2), "soft_area")[0, 0]
    torch.testing.assert_close(out, torch.tensor([[1.0, 1 / 16], [0.0, 0.0]]))


def test_hard_modes():
    # hard_any is the PyTorch code's rule: antialiased bilinear resize, then > 0. Its triangle
    # filter reaches one cell width around the cell centre, so a small object far from a
    # cell's centre does not mark it, and a corner pixel marks only its own cell.
    m = torch.zeros(1, 1, 16, 16)
    m[..., :4, :4] = 1  # 1/4 of the top-left 8x8 cell
    torch.testing.assert_close(
        downsample_mask(m, (2, 2), "hard_any")[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    )
    torch.testing.assert_close(downsample_mask(m, (2, 2), "hard_majority")[0, 0], torch.zeros(2, 2))
    m[..., :8, :6] = 1  # 6/8 of the top-left cell: a majority
    torch.testing.assert_close(
        downsample_mask(m, (2, 2), "hard_majority")[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    )
    majority = downsample_mask(_mask(), (2, 2), "hard_majority")[0, 0]
    torch.testing.assert_close(majority, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_bilinear_is_soft_and_exact_on_constant_blocks():
    m = torch.zeros(1, 1, 8, 8)
    m[..., :, :4] = 1  # left half
    out = downsample_mask(m, (4, 4), "bilinear")[0, 0]
    # bilinear (no antialias) at scale 2 samples between pixel pairs: left two columns 1, right 0
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4))
    half = downsample_mask(_mask(), (3, 3), "bilinear")
    assert ((half > 0) & (half < 1)).any() and half.min() >= 0 and half.max() <= 1


def test_unknown_mode_and_norm_are_errors():
    with pytest.raises(ValueError, match="unknown mask downsampling mode"):
        downsample_mask(_mask(), (2, 2), "nearest")
    with pytest.raises(ValueError, match="unknown pooling norm"):
        masked_average_pool(torch.ones(1, 2, 2, 2), torch.ones(1, 1, 2, 2), "max")


def test_masked_average_pool_norms():
    f = torch.arange(8, dtype=torch.float32).view(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    w = torch.tensor([[[[1.0, 0.5], [0.0, 0.0]]]])
    expected_sum = torch.tensor([[0 * 1 + 1 * 0.5, 4 * 1 + 5 * 0.5]])
    torch.testing.assert_close(masked_average_pool(f, w, "mask_sum", eps=0), expected_sum / 1.5)
    torch.testing.assert_close(masked_average_pool(f, w, "grid_size"), expected_sum / 4)
    torch.testing.assert_close(masked_average_pool(f, w, "mask_sum_plus_one"), expected_sum / 2.5)


def test_empty_mask_falls_back_to_global_average():
    f = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    w = torch.zeros(2, 1, 4, 4)
    w[1, :, 0, 0] = 1
    out = masked_average_pool(f, w)
    torch.testing.assert_close(out[0], f[0].mean((1, 2)))
    torch.testing.assert_close(out[1], f[1, :, 0, 0], rtol=1e-5, atol=1e-5)


def test_usable_masks_needs_every_view_inside_the_bounds():
    from sslmask.pooling import usable_masks

    full, empty, half = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    half[..., :2, :] = 1
    a = torch.cat([half, half, full, empty, half])
    b = torch.cat([half, full, half, half, torch.full((1, 1, 4, 4), 0.5)])
    assert usable_masks([a, b], 0.01, 0.99).tolist() == [True, False, False, False, True]
    assert usable_masks([a], 0.0, 1.0).all()
