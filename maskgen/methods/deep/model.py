"""The saliency network (HARL §3.2 C.2): a ResNet trunk, a 1x1 convolution without bias
predicting foregroundness on the last feature map, sigmoid, bilinear upsampling. Option: a
small ASPP decoder (DeepLabv3's atrous spatial pyramid pooling) in place of the 1x1 conv.

A head file is self-contained safetensors: the trunk's and the head's tensors plus metadata
(architecture, output stride, preprocessing, what it was trained on), so ``--method deep
--head FILE`` needs nothing else, and loading it executes no code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from maskio.atomic import atomic_open
from maskio.safeload import loads_json
from sslmask.backbones import Backbone, build_backbone, normalize

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
    def __init__(self, backbone: Backbone, decoder: str = "linear"):
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


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side at ``short_side``, aspect ratio kept."""
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
    """Keep the aspect ratio; the shorter side becomes ``short_side`` (bilinear)."""
    h, w = short_side_size(*image.shape[:2], short_side)
    return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # writable, for torch.from_numpy


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
    bfloat16 autocast. The input takes the network's memory format (channels_last where
    :func:`prepare_for_device` put the network in it).
    """
    small = [torch.from_numpy(resize_short_side(image, short_side)).permute(2, 0, 1) for image in images]
    return _forward_grouped(net, small, [im.shape[:2] for im in images], device, precision, max_batch)


@torch.no_grad()
def predict_maps_encoded(
    net: SaliencyNet,
    inputs: list[bytes | np.ndarray],
    short_side: int,
    device: str = "cpu",
    precision: str = "fp32",
    max_batch: int = 64,
) -> list[np.ndarray]:
    """As :func:`predict_maps`, for JPEG bytes decoded on ``device`` (nvJPEG on CUDA, in one
    batched call) mixed with already-decoded images. The resize runs there too (bilinear with
    antialiasing, like PIL's), so pixels go to the GPU compressed and only maps come back;
    maps agree with :func:`predict_maps` up to the decoders' and resizers' rounding.
    """
    images = decode_on_device(inputs, device)
    small = []
    for image in images:
        size = short_side_size(*image.shape[-2:], short_side)
        resized = F.interpolate(
            image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
        )
        small.append(resized[0].round_().clamp_(0, 255).to(torch.uint8))
    return _forward_grouped(net, small, [tuple(im.shape[-2:]) for im in images], device, precision, max_batch)


class JpegDecodeError(ValueError):
    """A JPEG the device decoder refused (truncated or corrupt)."""


def decode_on_device(inputs: list[bytes | np.ndarray], device: str) -> list[torch.Tensor]:
    """3 x H x W uint8 tensors on ``device``: JPEG bytes through ``torchvision.io.decode_jpeg``
    (all at once), H x W x 3 arrays copied over."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(inputs)
    jpegs = [i for i, x in enumerate(inputs) if isinstance(x, bytes | bytearray)]
    if jpegs:
        data = [torch.from_numpy(np.frombuffer(inputs[i], np.uint8).copy()) for i in jpegs]
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError as exc:
                raise JpegDecodeError(str(exc).splitlines()[0].split(", ")[-1]) from None
        for i, image in zip(jpegs, decoded, strict=True):
            out[i] = image
    for i, x in enumerate(inputs):
        if out[i] is None:
            out[i] = torch.from_numpy(np.require(x, np.uint8, ["C", "W"])).permute(2, 0, 1).to(device)
    return out  # type: ignore[return-value]


def _forward_grouped(
    net: SaliencyNet,
    small: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    device: str,
    precision: str,
    max_batch: int,
) -> list[np.ndarray]:
    """Run resized 3 x h x w uint8 images, batched by shape; maps back at ``sizes``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    net.eval()
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(small):
        by_shape.setdefault(tuple(s.shape[-2:]), []).append(i)
    cuda = str(device).startswith("cuda")
    layout = memory_format_of(net)
    out: list[np.ndarray] = [np.empty(0, np.float32)] * len(small)
    for group in by_shape.values():
        for start in range(0, len(group), max_batch):
            chunk = group[start : start + max_batch]
            batch = torch.stack([small[i] for i in chunk]).to(device, non_blocking=True)
            x = normalize(batch).contiguous(memory_format=layout)
            with torch.autocast("cuda" if cuda else "cpu", torch.bfloat16, enabled=precision == "bf16"):
                logits = net(x)
            logits = logits.float()
            for j, i in enumerate(chunk):
                up = F.interpolate(
                    logits[j : j + 1], size=tuple(sizes[i]), mode="bilinear", align_corners=False
                )
                out[i] = torch.sigmoid(up)[0, 0].cpu().numpy()
    return out


def prepare_for_device(net: SaliencyNet, device: str, channels_last: bool | None = None) -> SaliencyNet:
    """Move the network to ``device``; channels_last by default on CUDA (faster convolutions
    there; pass True to run it on CPU too)."""
    net = net.to(device)
    if channels_last is None:
        channels_last = str(device).startswith("cuda")
    return net.to(memory_format=torch.channels_last) if channels_last else net


def memory_format_of(net: torch.nn.Module) -> torch.memory_format:
    """channels_last when the network's first spatial convolution is stored that way."""
    for p in net.parameters():
        if p.dim() == 4 and p.shape[-1] > 1:
            nhwc = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if nhwc else torch.contiguous_format
    return torch.contiguous_format


def save_head(net: SaliencyNet, path: str | Path, meta: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    metadata = {
        "format": HEAD_FORMAT,
        **{k: json.dumps(v) for k, v in {**meta, "decoder": net.decoder}.items()},
    }
    from safetensors.torch import save

    with atomic_open(path, "wb") as f:  # safetensors whatever the file is called
        f.write(save(tensors, metadata=metadata))


def _read_head(path: str | Path, tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 (no items())
    except FileNotFoundError:
        raise HeadFileError(f"{path}: no such head file") from None
    except (SafetensorError, OSError) as exc:
        raise HeadFileError(f"{path}: not a safetensors head file ({exc})") from None
    if raw.get("format") != HEAD_FORMAT:
        raise HeadFileError(f"{path}: not a maskgen deep head (format {raw.get('format')!r})")
    try:
        meta = {k: loads_json(v) for k, v in raw.items() if k != "format"}
    except ValueError as exc:  # not JSON, or nested past the limit
        raise HeadFileError(f"{path}: bad head metadata ({exc})") from None
    meta.setdefault("decoder", "linear")
    missing = [k for k in ("arch", "out_stride") if k not in meta]
    if missing:
        raise HeadFileError(f"{path}: bad head metadata (no {missing[0]!r})")
    return meta, state


def _refuse_non_finite(path: str | Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """A head with NaN or infinite weights, integer weights or a negative BatchNorm variance
    predicts NaN or constant maps, and every mask of a build would silently fall back to the
    centre prior: refuse it instead."""
    for name, tensor in tensors:
        if name.endswith("num_batches_tracked"):
            continue
        if not tensor.is_floating_point():
            raise HeadFileError(
                f"{path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, not floating point"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise HeadFileError(f"{path}: tensor {name} holds NaN or infinite values")
        if name.endswith("running_var") and bool((tensor < 0).any()):
            raise HeadFileError(f"{path}: tensor {name} holds negative variances")


def check_head(path: str | Path) -> None:
    """What ``load_head`` would refuse, at plan time and without building the network's
    weights: metadata naming an arch / stride / decoder that exists, every tensor's name and
    shape those declare (the network built on the ``meta`` device, no memory), and finite
    values (one tensor in memory at a time). A bad head is refused before the build starts,
    not recorded as a failure on every image."""
    from safetensors import safe_open

    meta = read_head_meta(path)
    try:
        with torch.device("meta"):
            net = SaliencyNet(build_backbone(meta["arch"], meta["out_stride"]), meta["decoder"])
    except (ValueError, TypeError, KeyError) as exc:
        raise HeadFileError(f"{path}: bad head metadata ({exc})") from None
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        wrong = [k for k in sorted(set(want) & set(have)) if want[k] != have[k]]
        if missing or extra or wrong:
            detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                      else f"{wrong[0]} is {have[wrong[0]]}, not {want[wrong[0]]}")  # fmt: skip
            raise HeadFileError(f"{path}: tensors do not fit {meta['arch']} with the {meta['decoder']} decoder "
                                f"({detail})")  # fmt: skip
        _refuse_non_finite(path, ((name, f.get_tensor(name)) for name in f.keys()))  # noqa: SIM118


def read_head_meta(path: str | Path) -> dict[str, Any]:
    """A head file's metadata, without reading its tensors (what a build's planner needs)."""
    return _read_head(path, tensors=False)[0]


def load_head(path: str | Path) -> tuple[SaliencyNet, dict[str, Any]]:
    meta, tensors = _read_head(path, tensors=True)
    _refuse_non_finite(path, tensors.items())
    try:
        net = SaliencyNet(build_backbone(meta["arch"], meta["out_stride"]), meta["decoder"])
    except ValueError as exc:
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
