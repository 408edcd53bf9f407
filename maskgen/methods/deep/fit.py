"""``maskgen deep fit``: train the saliency head on the masks of an earlier build.

The student learns from its teacher's masks (DRFI or any other method): class-balanced
binary cross-entropy (MaskContrast's BalancedCrossEntropyLoss: each class weighted by the
other's share of the batch) between the upsampled logits and the crop's mask, on random
resized crops with flips and colour jitter. The backbone is frozen by default (HARL C.2);
``finetune`` also trains its last stage. Validation IoU is against the same masks on a
held-out tenth of the build. The head file is rewritten after every epoch.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maskgen.methods.deep.model import SaliencyNet, predict_maps, save_head
from maskgen.metrics import iou
from maskgen.shard_format import decode_mask_png
from sslmask.checkpoint import infer_arch, load_backbone
from sslmask.dataset import ViewsDataset, decode_rgb, index_shards
from sslmask.transforms import ViewSpec, normalize

FINETUNE = ("none", "layer4")


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with the positive pixels weighted by the negatives' share of the batch and vice versa."""
    pos = target.mean().clamp(1e-6, 1 - 1e-6)
    weight = torch.where(target > 0.5, 1 - pos, pos)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum()


def _val_miou(
    net: SaliencyNet, dataset: ViewsDataset, indices: list[int], short_side: int, device: str
) -> float:
    reader, rec = dataset.reader, dataset.records
    ious = []
    for i in indices:
        image = np.asarray(decode_rgb(reader.read(*rec.image[i]), rec.names[i]))
        mask = decode_mask_png(reader.read(*rec.mask[i]))
        ious.append(iou(predict_maps(net, [image], short_side, device)[0] > 0.5, mask))
    return float(np.mean(ious)) if ious else float("nan")


def fit_head(
    shards: list[str],
    backbone: str,
    out: str | Path,
    arch: str | None = None,
    out_stride: int = 32,
    epochs: int = 10,
    batch_size: int = 32,
    short_side: int = 224,
    lr: float = 1e-3,
    finetune: str = "none",
    val_fraction: float = 0.1,
    workers: int = 2,
    seed: int = 0,
    echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    if finetune not in FINETUNE:
        raise ValueError(f"--finetune must be one of {', '.join(FINETUNE)}, got {finetune!r}")
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = index_shards(shards, require_masks=True)
    trunk = load_backbone(backbone, arch, out_stride)
    net = SaliencyNet(trunk).to(device)
    for p in net.backbone.parameters():
        p.requires_grad_(False)
    if finetune == "layer4":
        for p in net.backbone.layer4.parameters():
            p.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, int(round(len(records) * val_fraction))) if len(records) > 1 else 0
    val_idx, train_idx = order[:n_val].tolist(), order[n_val:].tolist()
    if not train_idx:
        raise ValueError(f"{shards[0]}: too few samples to train on ({len(records)})")
    view = ViewSpec(size=short_side, scale=(0.3, 1.0), blur_p=0.0, solarize_p=0.0)
    dataset = ViewsDataset(records, [view], seed)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    total = epochs * steps_per_epoch
    meta: dict[str, Any] = {
        "arch": arch or infer_arch(trunk.state_dict())[0],
        "out_stride": out_stride,
        "short_side": short_side,
        "backbone": Path(backbone).name if backbone != "random" else f"random:{arch}",
        "trained_on": [str(Path(s)) for s in shards],
        "samples": len(train_idx),
        "finetune": finetune,
    }
    step = 0
    result: dict[str, Any] = {}
    for epoch in range(epochs):
        net.train()
        net.backbone.eval()  # frozen BN statistics, also when layer4 is fine-tuned
        perm = np.random.default_rng([seed, epoch]).permutation(train_idx)
        batches = [
            [(epoch, int(i)) for i in perm[s : s + batch_size]] for s in range(0, len(perm), batch_size)
        ]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers)
        losses = []
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x = normalize(batch["view0"].to(device))
            target = (batch["mask0"].to(device).float() / 255 > 0.5).float()
            logits = F.interpolate(net(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            loss = balanced_bce(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss))
            step += 1
        miou = _val_miou(net, dataset, val_idx, short_side, device)
        result = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_miou_vs_teacher": miou}
        save_head(net, out, {**meta, **result})
        echo(
            f"maskgen deep fit: epoch {epoch + 1}/{epochs} loss {result['loss']:.4f} val mIoU {miou:.3f} -> {out}"
        )
    return result
