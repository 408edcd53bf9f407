"""Leave-one-out retrieval (LoDisc's protocol, docs/methods.md §7.3): each image queries
all the others of the same split by cosine similarity.

Rank-k: one of the k nearest has the query's label. AP: the mean over the relevant items of
(relevant items up to rank r) / r at each relevant rank r; mAP is its mean over the queries.
A query whose class has no other image has nothing to retrieve: it is left out of all three
and counted as ``skipped``. Similarities are chunked matrix products, so 10,000 queries fit in
memory on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def retrieval_metrics(
    feats: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5), chunk: int = 512
) -> dict[str, float | int]:
    """Rank-k (%) for each k and mAP (%) over the queries that have a relevant item."""
    feats = F.normalize(feats.float(), dim=1)
    labels = labels.long()
    n = len(labels)
    hits = {k: 0 for k in ks}
    ap_sum, counted = 0.0, 0
    for start in range(0, n, chunk):
        q = feats[start : start + chunk]
        rows = torch.arange(len(q))
        sim = q @ feats.T
        sim[rows, start + rows] = float("-inf")  # leave the query itself out
        order = sim.argsort(dim=1, descending=True)[:, : n - 1]
        rel = labels[order] == labels[start : start + len(q), None]
        n_rel = rel.sum(1)
        valid = n_rel > 0
        for k in ks:
            hits[k] += int(rel[:, :k].any(1)[valid].sum())
        precision = rel.cumsum(1) / torch.arange(1, n, dtype=torch.float32)
        ap = (precision * rel).sum(1) / n_rel.clamp_min(1)
        ap_sum += float(ap[valid].sum())
        counted += int(valid.sum())
    out: dict[str, float | int] = {"queries": counted, "skipped": n - counted}
    for k in ks:
        out[f"rank{k}"] = round(100.0 * hits[k] / max(counted, 1), 2)
    out["mAP"] = round(100.0 * ap_sum / max(counted, 1), 2)
    return out
