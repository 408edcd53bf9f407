"""Losses, each a plain function of tensors (tested one by one in tests/test_sslmask_losses.py).

Per-sample forms are returned where a method needs to mix terms per sample (HARL's fallback
to the global term for samples whose mask is degenerate).
"""

from __future__ import annotations

import math

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


def float32_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in float32 even inside autocast. Casting the inputs is not enough: autocast
    runs every matrix product in bf16 (fp16 on CUDA) whatever its inputs, so similarities that
    a temperature of 0.1-0.2 then sharpens would carry bf16's 3 significant digits. For the
    methods whose reference trains in float32 (MoCo v2's InfoNCE, SegAS's prototype scores)."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: mean per-dimension std of L2-normalised embeddings.

    About ``1/sqrt(d)`` for well-spread embeddings, 0 when every sample maps to one point.
    """
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo's InfoNCE per sample: the key ``k`` of the same image against the ``queue`` of keys.

    ``q``, ``k``: N x D, ``queue``: K x D, all L2-normalised; ``-log softmax([q.k, q.queue] / tau)[0]``.
    """
    q, k, queue = q.float(), k.float().detach(), queue.float().detach()
    logits = torch.cat([(q * k).sum(1, keepdim=True), float32_products(q, queue)], dim=1) / tau
    return -F.log_softmax(logits, dim=1)[:, 0]


def moco_v3_loss(q: torch.Tensor, keys: torch.Tensor, tau: float, offset: int = 0) -> torch.Tensor:
    """MoCo v3's contrastive loss, scaled by ``2 tau``: the batch's keys are the negatives.

    ``q``: N x D queries of this process; ``keys``: M x D keys of every process (gathered, in
    rank order); query ``i`` matches key ``offset + i``. Both are L2-normalised here.
    """
    q = F.normalize(q.float(), dim=1)
    keys = F.normalize(keys.float().detach(), dim=1)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(q @ keys.T / tau, labels) * 2 * tau


def dino_loss(student: list[torch.Tensor], targets: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """DINO's cross-entropy over crop pairs: every student crop against every teacher (global)
    crop but its own, ``-sum(P_t log softmax(s / tau_s))``, averaged over pairs and the batch.

    ``student``: logits of all crops (the globals first); ``targets``: the teacher's centred,
    sharpened probabilities of the global crops.
    """
    total, pairs = 0.0, 0
    for iq, t in enumerate(targets):
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + (-t.detach() * F.log_softmax(s.float() / student_temp, dim=-1)).sum(-1).mean()
            pairs += 1
    return total / pairs


def search_loss(
    student: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """SCFS's feature-search term: ``-sum(P_t log softmax(s / tau_s))`` per row, averaged over
    the rows whose weight is 1 (gated-out local crops have weight 0; all gated gives 0).

    ``student``: M x D logits; ``targets``: M x D teacher probabilities; ``weights``: M.
    """
    ce = (-targets.detach() * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)
    w = weights.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


# SegAS (docs/methods.md §4): calibrated prototype targets and the prototype loss


def confidence(p: torch.Tensor) -> torch.Tensor:
    """Eq. 8: rho = max p (1 - H(p) / log M), in [0, 1]; B x M probabilities -> B."""
    entropy = -torch.xlogy(p, p).sum(1)
    return p.max(1).values * (1 - entropy / math.log(p.shape[1]))


def mu_threshold(sim: torch.Tensor, mu: str) -> torch.Tensor:
    """Eq. 6's mu_s from B x M key-prototype cosines, in one of its readings (docs/methods.md §4):
    ``sample_max`` (``max``, its old name) the batch mean of each sample's best prototype ⟨A⟩;
    ``prototype_max`` Eq. 6 as printed, the mean over the M prototypes of each one's best
    sample; ``mean`` per sample, the mean over prototypes (B x 1)."""
    if mu == "mean":
        return sim.mean(1, keepdim=True)
    if mu == "prototype_max":
        return sim.max(0).values.mean()
    if mu in ("sample_max", "max"):
        return sim.max(1).values.mean()
    raise ValueError(f"segas.mu={mu!r}: must be one of sample_max, prototype_max, mean")


def calibrated_target(
    sim: torch.Tensor, label: torch.Tensor, tau_k: float, tau_rho: float, mu: str = "mean"
) -> torch.Tensor:
    """Eqs. 6-9 for one level: B x M key-prototype cosines and B k-means labels -> B x M targets."""
    sim = sim.float()  # bf16 under autocast: the thresholds and the softmax run in float32
    threshold = mu_threshold(sim, mu)
    p = torch.softmax(torch.where(sim < threshold, torch.full_like(sim, -1.0), sim) / tau_k, dim=1)
    rho = confidence(p).unsqueeze(1)
    onehot = F.one_hot(label, sim.shape[1]).to(p.dtype)
    return torch.where(rho < tau_rho, onehot, rho * p + (1 - rho) * onehot)


def procr_loss(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per sample: KL(target || softmax(logits)), with 0 log 0 = 0."""
    target = target.float()
    return (torch.xlogy(target, target) - target * torch.log_softmax(logits.float(), dim=1)).sum(1)
