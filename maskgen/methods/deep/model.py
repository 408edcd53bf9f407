"""The saliency network (HARL §3.2 C.2): a ResNet trunk, a 1x1 convolution without bias
predicting foregroundness on the last feature map, sigmoid, bilinear upsampling. Option: a
small ASPP decoder (DeepLabv3's atrous spatial pyramid pooling) in place of the 1x1 conv.

A head file is self-contained safetensors: the trunk's and the head's tensors plus metadata
(architecture, output stride, preprocessing, what it was trained on), so ``--method deep
--head FILE`` needs nothing else, and loading it executes no code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sslmask.backbones import ResNetTrunk, build_backbone
from sslmask.checkpoint import save_atomic
from sslmask.transforms import normalize

HEAD_FORMAT = "maskgen-deep-head/1"


class HeadFileError(Exception):
    """A head file that is missing, malformed or does not fit its recorded backbone."""


DECODERS = ("linear", "aspp")


class ASPPHead(nn.Module):
    """DeepLabv3's ASPP, small: a 1x1 branch, three 3x3 atrous branches and an image-pooling
    branch, concatenated, projected, then a 1x1 conv to one foreground logit.

    Rates are DeepLabv3's (6, 12, 18) at output stride 16, halved at stride 32, so each branch
    sees the same image area whatever the stride.
    """

    def __init__(self, in_channels: int, out_stride: int, channels: int = 128):
        super().__init__()
        rates = (6, 12, 18) if out_stride == 16 else (3, 6, 9)

        def conv_bn(k: int, dilation: int = 1) -> nn.Sequential:
            pad = dilation * (k // 2)
            return nn.Sequential(
                nn.Conv2d(in_channels, channels, k, padding=pad, dilation=dilation, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )

        self.branches = nn.ModuleList([conv_bn(1), *(conv_bn(3, r) for r in rates)])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn(1))
        self.project = nn.Sequential(
            nn.Conv2d(channels * 5, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        y = torch.cat([*(b(x) for b in self.branches), pooled], dim=1)
        return self.classifier(self.project(y))


class SaliencyNet(nn.Module):
    def __init__(self, backbone: ResNetTrunk, decoder: str = "linear"):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.backbone = backbone
        self.decoder = decoder
        if decoder == "aspp":
            self.head: nn.Module = ASPPHead(backbone.num_features, backbone.out_stride)
        else:
            self.head = nn.Conv2d(backbone.num_features, 1, kernel_size=1, bias=False)
            nn.init.normal_(self.head.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised N x 3 x H x W -> foreground logits on the feature grid, N x 1 x h x w."""
        return self.head(self.backbone(x))


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Keep the aspect ratio; the shorter side becomes ``short_side`` (bilinear)."""
    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.array(Image.fromarray(image).resize(size, Image.BILINEAR))  # writable, for torch.from_numpy


PRECISIONS = ("fp32", "bf16")


@torch.no_grad()
def predict_maps(
    net: SaliencyNet,
    images: list[np.ndarray],
    short_side: int,
    device: str = "cpu",
    precision: str = "fp32",
    max_batch: int = 64,
) -> list[np.ndarray]:
    """Soft maps in [0, 1] at each image's own size (images of one call may differ in size).

    Images that resize to the same shape run as one batch (so a batch is exact, never padded:
    each map equals the image's own forward pass); ``precision="bf16"`` runs the network under
    bfloat16 autocast. On CUDA the input is channels_last, matching :func:`prepare_for_device`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    net.eval()
    small = [resize_short_side(image, short_side) for image in images]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(small):
        by_shape.setdefault(s.shape[:2], []).append(i)
    cuda = str(device).startswith("cuda")
    layout = torch.channels_last if cuda else torch.contiguous_format
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(images)
    for group in by_shape.values():
        for start in range(0, len(group), max_batch):
            chunk = group[start : start + max_batch]
            batch = torch.from_numpy(np.stack([small[i] for i in chunk])).to(device, non_blocking=True)
            x = normalize(batch.permute(0, 3, 1, 2)).contiguous(memory_format=layout)
            with torch.autocast("cuda" if cuda else "cpu", torch.bfloat16, enabled=precision == "bf16"):
                logits = net(x)
            logits = logits.float()
            for j, i in enumerate(chunk):
                up = F.interpolate(
                    logits[j : j + 1], size=images[i].shape[:2], mode="bilinear", align_corners=False
                )
                out[i] = torch.sigmoid(up)[0, 0].cpu().numpy()
    return out


def prepare_for_device(net: SaliencyNet, device: str) -> SaliencyNet:
    """Move the network to ``device``; channels_last on CUDA (faster convolutions there)."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if str(device).startswith("cuda") else net


def save_head(net: SaliencyNet, path: str | Path, meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    metadata = {
        "format": HEAD_FORMAT,
        **{k: json.dumps(v) for k, v in {**meta, "decoder": net.decoder}.items()},
    }
    save_atomic(tensors, path, metadata, safetensors=True)  # whatever the file is called


def load_head(path: str | Path) -> tuple[SaliencyNet, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except FileNotFoundError:
        raise HeadFileError(f"{path}: no such head file") from None
    except (SafetensorError, OSError) as exc:
        raise HeadFileError(f"{path}: not a safetensors head file ({exc})") from None
    if raw.get("format") != HEAD_FORMAT:
        raise HeadFileError(f"{path}: not a maskgen deep head (format {raw.get('format')!r})")
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
        meta.setdefault("decoder", "linear")
        net = SaliencyNet(build_backbone(meta["arch"], meta["out_stride"]), meta["decoder"])
    except (KeyError, ValueError) as exc:
        raise HeadFileError(f"{path}: bad head metadata ({exc})") from None
    try:
        result = net.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise HeadFileError(
            f"{path}: tensors do not fit {meta['arch']} ({str(exc).splitlines()[-1].strip()})"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise HeadFileError(
            f"{path}: tensors do not fit {meta['arch']} with the {meta['decoder']} decoder "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    return net.eval(), meta
