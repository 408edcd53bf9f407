"""Losses, each a plain function of tensors (tested one by one in tests/test_sslmask_losses.py).

Per-sample forms are returned where a method needs to mix terms per sample (HARL's fallback
to the global term for samples whose mask is degenerate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE per sample: ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.float().detach(), dim=-1)


def harl_mask_loss(
    p_fg: torch.Tensor, z_fg: torch.Tensor, p_bg: torch.Tensor, z_bg: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HARL Eq. 1 per sample: ``alpha * L(p_f, z'_f) + (1 - alpha) * L(p_b, z'_b)``.

    Returns ``(mask_loss, fg_term, bg_term)``, all of shape N.
    """
    fg = regression_loss(p_fg, z_fg)
    bg = regression_loss(p_bg, z_bg)
    return alpha * fg + (1 - alpha) * bg, fg, bg


def harl_hybrid_loss(mask_loss: torch.Tensor, global_loss: torch.Tensor, lam: float) -> torch.Tensor:
    """HARL Eq. 4 per sample: ``lambda * L_mask + (1 - lambda) * L_global``."""
    return lam * mask_loss + (1 - lam) * global_loss


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: mean per-dimension std of L2-normalised embeddings.

    About ``1/sqrt(d)`` for well-spread embeddings, 0 when every sample maps to one point.
    """
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()
