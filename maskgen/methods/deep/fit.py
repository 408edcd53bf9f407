"""``maskgen deep fit``: train the saliency head on the masks of an earlier build.

The student learns from its teacher's masks (DRFI or any other method): class-balanced
binary cross-entropy (MaskContrast's BalancedCrossEntropyLoss: each class weighted by the
other's share of the batch) between the upsampled logits and the crop's mask, on random
resized crops with flips and colour jitter; ``iou_weight`` adds BASNet's soft-IoU term. The
backbone is frozen by default (HARL C.2); ``finetune`` also trains its last stage(s), or all
of it. Validation is on a held-out tenth of the build: mIoU against the teacher's masks,
and, where ground truth exists (``--gt DIR``, or the build's own source, as in ``maskgen
eval``), the student's and the teacher's mIoU against it, which says whether the student has
overtaken its teacher. ``rounds`` adds self-training:
the student re-labels the training images (post-processed exactly like a build's masks) and
trains on its own masks for another ``epochs``, with a fresh cosine schedule; validation stays
against the original teacher and the ground truth. The head file is rewritten after every
epoch.
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from maskgen.groundtruth import GroundTruthLookup, fit_to_shape, safe_lookup
from maskgen.imaging import encode_mask_png
from maskgen.methods.deep.crops import TeacherCrops
from maskgen.methods.deep.model import SaliencyNet, predict_maps, save_head
from maskgen.metrics import iou
from maskgen.postprocess import PostprocessConfig, binarize
from maskio.buildlock import reading_builds
from maskio.metadata import read_manifest
from maskio.records import Records, index_shards
from maskio.shard_format import FIELD_META, MANIFEST, decode_meta, in_sample, index_tar
from sslmask.backbones import check_batch_memory, normalize
from sslmask.checkpoint import infer_arch, load_backbone

# which backbone stages train besides the head; "all" also updates BatchNorm statistics
FINETUNE = {"none": (), "layer4": ("layer4",), "layer3": ("layer3", "layer4"), "all": ("",)}


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with the positive pixels weighted by the negatives' share of the batch and vice versa."""
    pos = target.mean().clamp(1e-6, 1 - 1e-6)
    weight = torch.where(target > 0.5, 1 - pos, pos)
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum()


def soft_iou_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft IoU of each image's sigmoid map with its mask, averaged over the batch.

    The IoU term of BASNet's hybrid loss (Qin et al., CVPR 2019): it scores each image as a
    whole, so it pushes the map towards the mask's extent, which per-pixel BCE (balanced or
    not) leaves to the threshold."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    union = (prob + target - prob * target).sum(1)
    return (1 - (inter + 1) / (union + 1)).mean()


def saliency_loss(logits: torch.Tensor, target: torch.Tensor, iou_weight: float = 0.0) -> torch.Tensor:
    """The head's training loss: class-balanced BCE (HARL's), plus ``iou_weight`` x soft IoU."""
    loss = balanced_bce(logits, target)
    if iou_weight:
        loss = loss + iou_weight * soft_iou_loss(logits, target)
    return loss


@dataclass
class _ValSample:
    image: np.ndarray
    teacher: np.ndarray  # bool mask of the build
    gt: np.ndarray | None  # bool ground truth at the image's size, when known


def _sample_paths(dataset: TeacherCrops, indices: list[int]) -> dict[int, str]:
    """The source ``path`` of each sample (from its json); only the tars involved are re-indexed
    (the records keep image and mask offsets, not the json's)."""
    rec = dataset.records
    assert rec.mask is not None
    wanted: dict[int, dict[str, int]] = {}
    for i in indices:  # the mask's file is the sample's shard (its image may be joined from a folder)
        wanted.setdefault(int(rec.mask[i][0]), {})[rec.names[i]] = i
    out = {}
    for fid, keys in wanted.items():
        for key, fields in index_tar(rec.files[fid]):
            if key in keys and FIELD_META in fields:
                with in_sample(rec.files[fid], key):
                    meta = decode_meta(dataset.reader.read(fid, *fields[FIELD_META]))
                out[keys[key]] = meta.get("path") or ""
    return out


def _ground_truth_lookup(shards: list[str], gt_dir: str | None) -> GroundTruthLookup | None:
    """``--gt DIR``, else the source of the build ``shards[0]`` names (as ``maskgen eval`` and
    the report find it); None when there is no build manifest to say."""
    if gt_dir:
        return GroundTruthLookup(gt_dir=gt_dir)
    manifest = Path(shards[0]) / MANIFEST
    return safe_lookup(read_manifest(manifest)) if manifest.is_file() else None


def _load_val(
    dataset: TeacherCrops, indices: list[int], lookup: GroundTruthLookup | None
) -> list[_ValSample]:
    paths = _sample_paths(dataset, indices) if lookup is not None else {}
    out = []
    for i in indices:
        image = np.asarray(dataset.image(i))
        teacher = dataset.mask(i)
        gt = lookup(paths[i]) if lookup is not None and paths.get(i) else None
        out.append(_ValSample(image, teacher, None if gt is None else fit_to_shape(gt, teacher.shape)))
    return out


def teacher_scores(val: list[_ValSample]) -> dict[str, float]:
    """The teacher's mIoU vs ground truth on the validation images that have it (fixed for a fit)."""
    with_gt = [v for v in val if v.gt is not None]
    if not with_gt:
        return {}
    return {
        "teacher_miou_vs_gt": float(np.mean([iou(v.teacher, v.gt) for v in with_gt])),
        "val_with_gt": len(with_gt),
    }


def validate(net: SaliencyNet, val: list[_ValSample], short_side: int, device: str) -> dict[str, float]:
    """Student mIoU vs the teacher's masks, and vs ground truth where known."""
    if not val:
        return {}
    pred = [m > 0.5 for m in predict_maps(net, [v.image for v in val], short_side, device)]
    out = {"val_miou_vs_teacher": float(np.mean([iou(p, v.teacher) for p, v in zip(pred, val, strict=True)]))}
    with_gt = [(p, v.gt) for p, v in zip(pred, val, strict=True) if v.gt is not None]
    if with_gt:
        out["val_miou_vs_gt"] = float(np.mean([iou(p, gt) for p, gt in with_gt]))
    return out


def epoch_batches(order: list[int], batch_size: int, epoch: int) -> list[list[tuple[int, int]]]:
    """``order`` cut into batches of ``(epoch, index)``; a last batch of one sample joins the one
    before it, since BatchNorm (ASPP's pooled branch, a fine-tuned backbone) cannot train on it."""
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return [[(epoch, int(i)) for i in b] for b in batches]


def trainable_parameters(net: SaliencyNet, finetune: str) -> list[torch.nn.Parameter]:
    """Freeze the backbone but the stages ``finetune`` names; the head always trains."""
    for name, p in net.backbone.named_parameters():
        p.requires_grad_(any(name.startswith(stage) for stage in FINETUNE[finetune]))
    return [p for p in net.parameters() if p.requires_grad]


def relabel(
    net: SaliencyNet, dataset: TeacherCrops, indices: list[int], short_side: int, device: str, path: Path
) -> Records:
    """The student's masks for ``indices``, post-processed as in a build, as PNGs in one file at
    ``path``; returns the dataset's records with those samples' masks pointing there."""
    rec = dataset.records
    assert rec.mask is not None
    mask = rec.mask.copy()
    fid = len(rec.files)
    with open(path, "wb") as f:
        for start in range(0, len(indices), 16):
            chunk = indices[start : start + 16]
            images = [np.asarray(dataset.image(i)) for i in chunk]
            for i, sal in zip(chunk, predict_maps(net, images, short_side, device), strict=True):
                png = encode_mask_png(binarize(sal, PostprocessConfig()).mask)
                mask[i] = (fid, f.tell(), len(png))
                f.write(png)
    return replace(rec, files=[*rec.files, str(path)], mask=mask)


@dataclass(frozen=True)
class FitConfig:
    """What ``maskgen deep fit`` trains, on what, and how (the CLI's options, one for one)."""

    shards: tuple[str, ...]
    backbone: str  # a checkpoint, a torchvision/timm weight name, or "random"
    out: str
    arch: str | None = None
    out_stride: int = 32
    epochs: int = 10
    batch_size: int = 32
    short_side: int = 224
    lr: float = 1e-3
    finetune: str = "none"
    decoder: str = "linear"
    val_fraction: float = 0.1
    gt: str | None = None
    images: str | None = None  # image folder of masks-only shards
    rounds: int = 0
    iou_weight: float = 0.0
    info: tuple[tuple[str, Any], ...] = ()  # provenance recorded in the head file
    workers: int = 2
    seed: int = 0

    def check(self) -> None:
        if self.finetune not in FINETUNE:
            raise ValueError(f"--finetune must be one of {', '.join(FINETUNE)}, got {self.finetune!r}")
        if self.rounds < 0:
            raise ValueError(f"--rounds must be >= 0, got {self.rounds}")
        if self.iou_weight < 0:
            raise ValueError(f"--iou-weight must be >= 0, got {self.iou_weight}")

    def head_meta(self, arch: str, samples: int) -> dict[str, Any]:
        """The metadata every epoch's head file starts from."""
        return {
            "arch": arch,
            "out_stride": self.out_stride,
            "short_side": self.short_side,
            "backbone": Path(self.backbone).name if self.backbone != "random" else f"random:{self.arch}",
            "trained_on": [str(Path(s)) for s in self.shards],
            "samples": samples,
            "finetune": self.finetune,
            **({"iou_weight": self.iou_weight} if self.iou_weight else {}),
            **dict(self.info),
        }


def split_val(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded held-out tenth (``fraction``) for validation, and the rest to train on."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction))) if n > 1 else 0
    return order[:n_val].tolist(), order[n_val:].tolist()


def train_epoch(
    net: SaliencyNet, opt: torch.optim.Optimizer, loader: DataLoader, cfg: FitConfig, step: int, total: int
) -> tuple[float, int]:
    """One epoch of cosine-scheduled steps from ``step``; returns the mean loss and the next step."""
    device = next(net.parameters()).device
    net.train()
    if cfg.finetune != "all":
        net.backbone.eval()  # frozen BN statistics, also when the last stages train
    losses = []
    for images, masks in loader:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        x = normalize(images.to(device))
        logits = F.interpolate(net(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        loss = saliency_loss(logits, masks.to(device), cfg.iou_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
    return float(np.mean(losses)), step


def fit_head(
    cfg: FitConfig, echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
) -> dict[str, Any]:
    """Train a head on the masks of ``cfg.shards``; the head file is rewritten every epoch.
    The builds it reads stay locked against a rebuild while it runs (``maskio.buildlock``)."""
    with reading_builds(list(cfg.shards)):
        return _fit_head(cfg, echo)


def _fit_head(cfg: FitConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    cfg.check()
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = index_shards(cfg.shards, require_masks=True, images=cfg.images)
    trunk = load_backbone(cfg.backbone, cfg.arch, cfg.out_stride)
    net = SaliencyNet(trunk, cfg.decoder).to(device)
    check_batch_memory(
        net, cfg.short_side, cfg.batch_size, training=True, hint="--short-side or --batch-size"
    )
    opt = torch.optim.AdamW(trainable_parameters(net, cfg.finetune), lr=cfg.lr, weight_decay=1e-4)
    val_idx, train_idx = split_val(len(records), cfg.val_fraction, cfg.seed)
    if not train_idx:
        raise ValueError(f"{cfg.shards[0]}: too few samples to train on ({len(records)})")
    dataset = TeacherCrops(records, cfg.short_side, cfg.seed)
    total = cfg.epochs * math.ceil(len(train_idx) / cfg.batch_size)
    meta = cfg.head_meta(cfg.arch or infer_arch(trunk.state_dict())[0], len(train_idx))
    val = _load_val(dataset, val_idx, _ground_truth_lookup(list(cfg.shards), cfg.gt))
    meta.update(teacher_scores(val))
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="maskgen-deep-fit-") as tmp:
        for rnd in range(cfg.rounds + 1):
            if rnd > 0:  # self-training: the student's own masks become the targets
                path = Path(tmp) / f"round{rnd}.png"
                dataset = TeacherCrops(
                    relabel(net, dataset, train_idx, cfg.short_side, device, path), cfg.short_side, cfg.seed
                )
            step = 0
            for epoch in range(cfg.epochs):
                perm = np.random.default_rng([cfg.seed, rnd, epoch]).permutation(train_idx)
                batches = epoch_batches(perm.tolist(), cfg.batch_size, epoch)
                loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers)
                loss, step = train_epoch(net, opt, loader, cfg, step, total)
                result = {**meta, "round": rnd, "epoch": epoch + 1, "loss": loss,
                          **validate(net, val, cfg.short_side, device)}  # fmt: skip
                save_head(net, cfg.out, result)
                echo(f"maskgen deep fit: round {rnd}/{cfg.rounds} epoch {epoch + 1}/{cfg.epochs} "
                     f"loss {loss:.4f} {describe(result)} -> {cfg.out}")  # fmt: skip
    return result


def describe(result: dict[str, Any]) -> str:
    """``val mIoU vs teacher 0.712, vs ground truth 0.540 (teacher 0.561, 40 images)``."""
    text = f"val mIoU vs teacher {result.get('val_miou_vs_teacher', float('nan')):.3f}"
    if "val_miou_vs_gt" in result:
        text += (f", vs ground truth {result['val_miou_vs_gt']:.3f} "
                 f"(teacher {result['teacher_miou_vs_gt']:.3f}, {result['val_with_gt']} images)")  # fmt: skip
    return text
