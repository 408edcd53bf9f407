"""Weighted k-NN classification (Wu et al. 2018, as in DINO's eval_knn): cosine similarity on
L2-normalised features, the k nearest vote with weight exp(sim / T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``Q x num_classes`` for each query (argmax = prediction)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(query_feats), chunk):
        q = F.normalize(query_feats[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_labels[idx], weight)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    out = {}
    for k in ks:
        k_eff = min(k, scores.shape[1])
        hit = (scores.topk(k_eff, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = round(100.0 * int(hit.sum()) / len(hit), 2)  # counts: exact, printable
    return out


def compact_labels(
    train_labels: torch.Tensor, val_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Labels renumbered 0..C-1 over the classes present: the class count is bounded by the
    samples, not by the largest label a shard claims (a label of 10**15 must not size a tensor)."""
    classes, inverse = torch.unique(torch.cat([train_labels, val_labels]), return_inverse=True)
    return inverse[: len(train_labels)], inverse[len(train_labels) :], len(classes)


def knn_eval(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    ks: tuple[int, ...] = (10, 20, 30),
    temperature: float = 0.07,
) -> dict[str, dict[str, float]]:
    """Top-1/top-5 accuracy (%) for each k; a k larger than the bank uses the whole bank and
    says so (``k_used``)."""
    train_labels, val_labels, num_classes = compact_labels(train_labels, val_labels)
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        scores = knn_predict(train_feats, train_labels, val_feats, k, temperature, num_classes)
        out[f"k={k}"] = topk_accuracy(scores, val_labels)
        if k > len(train_labels):
            out[f"k={k}"]["k_used"] = len(train_labels)
    return out
