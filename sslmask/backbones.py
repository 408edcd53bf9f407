"""Backbones: ResNet trunks here, Vision Transformers in ``sslmask.vit``; one interface.

Every trunk gives ``forward(x)`` -> its feature grid N x C x h x w (the grid HARL pools masks on
and ``maskgen``'s deep head reads), ``pooled(x)`` -> N x C (ResNet: the grid's mean; ViT: the
CLS token), ``features(x)`` -> both from one pass, ``stage_features(x, taps)`` -> the pooled
feature and the grids of earlier stages (ResNet: layer numbers; ViT: block numbers), and
``num_features`` = C (``stage_channels(taps)`` for the earlier grids).

A trunk is torchvision's ``ResNet`` without ``avgpool``/``fc``: parameter names are
torchvision's, so an exported state_dict loads into ``torchvision.models.resnet50()`` with
only ``fc.*`` missing. ``out_stride=16`` dilates the last stage (torchvision's
``replace_stride_with_dilation``; ResNet-18/34 through ``DilatedBasicBlock``), giving 14x14 maps
at 224 (HARL §5.1: better than 7x7).
``resnet_tiny`` is the same design with 1 block per stage and widths 16..128, for CPU tests
and the offline demo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, conv3x3


@runtime_checkable
class Backbone(Protocol):
    """What a method, an evaluation or ``deep``'s head may ask of a trunk, whichever kind it is
    (``ResNetTrunk`` here, ``sslmask.vit.ViTTrunk``). Both are ``nn.Module``s as well; a caller
    asks ``is_vit`` rather than probing for a ViT's attributes."""

    is_vit: bool
    num_features: int  # C of the last grid and of the pooled feature
    out_stride: int  # input pixels per grid cell

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature grid, N x C x h x w."""
        ...

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """N x C: a ResNet's grid mean, a ViT's CLS token."""
        ...

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled, grid)`` from one pass."""
        ...

    def stage_features(self, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(pooled, [grid of each tapped stage or block])`` from one pass."""
        ...

    def stage_channels(self, taps: Sequence[int]) -> list[int]:
        """The channels of each tapped grid (ValueError for one that does not exist)."""
        ...


@runtime_checkable
class ViTBackbone(Backbone, Protocol):
    """What a ViT trunk offers beyond :class:`Backbone` (``sslmask.vit.ViTTrunk``): the patch
    embedding MoCo v3 freezes, and the attention maps LoDisc ranks patches by."""

    patch_embed: nn.Module

    def pooled_and_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(CLS token, per block the softmaxed attention averaged over heads)`` from one pass."""
        ...

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per block, the softmaxed attention averaged over heads: N x T x T."""
        ...


def as_vit(trunk: Backbone, why: str) -> ViTBackbone:
    """``trunk`` as a :class:`ViTBackbone`; ValueError naming ``why`` for a ResNet."""
    if not trunk.is_vit or not isinstance(trunk, ViTBackbone):
        raise ValueError(f"{why} needs a ViT trunk, got {type(trunk).__name__}")
    return trunk


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHS: dict[str, tuple[type[nn.Module], list[int], tuple[int, int, int, int]]] = {
    "resnet_tiny": (BasicBlock, [1, 1, 1, 1], (16, 32, 64, 128)),
    "resnet18": (BasicBlock, [2, 2, 2, 2], (64, 128, 256, 512)),
    "resnet34": (BasicBlock, [3, 4, 6, 3], (64, 128, 256, 512)),
    "resnet50": (Bottleneck, [3, 4, 6, 3], (64, 128, 256, 512)),
}


class DilatedBasicBlock(BasicBlock):
    """torchvision's BasicBlock, which refuses ``dilation > 1``, with dilated 3x3 convs: ResNet-18/34
    at output stride 16. Parameter names are BasicBlock's, so state_dicts load either way."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None):  # fmt: skip
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        if dilation > 1:
            self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
            self.conv2 = conv3x3(planes, planes, dilation=dilation)


class ResNetTrunk(ResNet):
    """torchvision ResNet with configurable widths, no classifier; ``forward`` -> N x C x h x w."""

    is_vit = False

    def __init__(self, block, layers: list[int], widths=(64, 128, 256, 512), out_stride: int = 32):
        if out_stride not in (16, 32):
            raise ValueError(f"out_stride must be 16 or 32, got {out_stride}")
        nn.Module.__init__(self)
        block = DilatedBasicBlock if block is BasicBlock else block
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2, dilate=out_stride == 16)
        self.out_stride = out_stride
        self.stage_widths = [w * block.expansion for w in widths]
        self.num_features = self.stage_widths[3]
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled N x C, grid N x C x h x w)`` from one pass."""
        grid = self(x)
        return grid.mean(dim=(2, 3)), grid

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).mean(dim=(2, 3))

    def stage_features(self, x: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(pooled N x C, [grid of stage t for t in taps])`` from one pass; stage ``t`` is
        torchvision's ``layer{t}`` (SCFS's Res2/Res3/Res4 are layers 2, 3, 4)."""
        self.stage_channels(taps)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        grids: dict[int, torch.Tensor] = {}
        for t, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x = layer(x)
            grids[t] = x
        return x.mean(dim=(2, 3)), [grids[t] for t in taps]

    def stage_channels(self, taps: Sequence[int]) -> list[int]:
        """The channels of each tapped stage's grid (ValueError for a stage that does not exist)."""
        if not taps or any(t not in (1, 2, 3, 4) for t in taps):
            raise ValueError(f"ResNet taps are stages 1..4, got {list(taps)}")
        return [self.stage_widths[t - 1] for t in taps]


def zero_init_residual(trunk: nn.Module) -> None:
    """torchvision's ``zero_init_residual=True``: the last BN of every residual block starts at
    gamma 0, so each block starts as its identity (MoCo v3 builds its ResNets so)."""
    for m in trunk.modules():
        if isinstance(m, Bottleneck):
            nn.init.constant_(m.bn3.weight, 0)
        elif isinstance(m, BasicBlock):
            nn.init.constant_(m.bn2.weight, 0)


VIT_NAMES = (
    "vit_micro",
    "vit_tiny",
    "vit_small",
    "vit_base",
)  # sslmask.vit.VIT_ARCHS, without importing timm
BACKBONES = (*ARCHS, *VIT_NAMES)


def build_backbone(arch: str, out_stride: int = 32) -> Backbone:
    """A randomly initialised trunk. ``out_stride`` (16 or 32) is a ResNet setting; a ViT's
    grid always has the patch stride, 16."""
    if arch in VIT_NAMES:
        from sslmask.vit import build_vit

        return build_vit(arch)
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; choose from {', '.join(BACKBONES)}")
    block, layers, widths = ARCHS[arch]
    return ResNetTrunk(block, layers, widths, out_stride)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float, ImageNet mean/std (on whatever device the batch is)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def check_batch_memory(
    backbone: torch.nn.Module, image_size: int, batch_size: int, training: bool = False, hint: str = ""
) -> None:
    """MemoryError (one line) when a batch of ``batch_size`` images of ``image_size`` px cannot
    fit: one image through a meta-device copy of the network (no memory, milliseconds) gives its
    activations; inference holds the input and about three of the largest at once, training
    keeps all of them for the backward. An in-range ``--image-size 4096`` would otherwise
    allocate tens of GB before failing. CPU only: on a GPU, torch's out-of-memory error comes
    before anything is lost, and host memory is not what runs out."""
    if next(backbone.parameters()).device.type != "cpu":
        return
    import copy

    from maskio.memory import check_fits

    meta = copy.deepcopy(backbone).to("meta").eval()
    sizes: list[int] = []

    def record(_module, _inputs, output) -> None:
        sizes.extend(t.numel() for t in (output if isinstance(output, (tuple, list)) else (output,))
                     if isinstance(t, torch.Tensor))  # fmt: skip

    # leaves that allocate (an in-place ReLU writes over its input)
    leaves = [m for m in meta.modules() if not list(m.children()) and not getattr(m, "inplace", False)]
    hooks = [m.register_forward_hook(record) for m in leaves]
    with torch.no_grad():
        getattr(meta, "pooled", meta)(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in hooks:
        h.remove()
    held = sum(sizes) if training else 3 * max(sizes, default=0)
    needed = batch_size * 4 * (3 * image_size**2 + held)
    try:
        check_fits(needed, f"a batch of {batch_size} images at {image_size} px")
    except MemoryError as exc:
        raise MemoryError(f"{exc}: lower {hint or '--image-size or --batch-size'}") from None
