"""Joint image+mask augmentation, driven by an explicit random generator.

Every random draw comes from a ``torch.Generator`` the caller seeds per sample (from the run
seed, the epoch and the sample index), so a sample's views do not depend on which process or
DataLoader worker made them: that is what makes resumed and distributed runs reproduce an
uninterrupted one exactly.

Geometry (crop, flip) is applied to the image and the mask with the same box; colour, grey,
blur and solarisation touch the image only (HARL, docs/methods.md Table A1). The mask is resized
with PIL's BOX filter, so each output pixel holds the foreground *fraction* of the source
area it covers (0..255), the soft map the area-mode feature-grid downsampling starts from.
Images leave as uint8 tensors; normalisation (``sslmask.backbones.normalize``) happens on the
training device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image


@dataclass(frozen=True)
class ViewSpec:
    """One view's augmentation parameters (defaults: HARL/BYOL view T, docs/methods.md Table A1)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    # mask-guided re-crop (HARL PyTorch code: min 20 % foreground, 5 tries); 0 disables it
    min_fg: float = 0.0
    recrop_tries: int = 5


def byol_views(size: int, min_fg: float = 0.0, min_scale: float = 0.08) -> tuple[ViewSpec, ViewSpec]:
    """The asymmetric pair T / T' of BYOL and HARL (also MoCo v3's and DINO's two global crops)."""
    scale = (min_scale, 1.0)
    return (
        ViewSpec(size=size, scale=scale, blur_p=1.0, solarize_p=0.0, min_fg=min_fg),
        ViewSpec(size=size, scale=scale, blur_p=0.1, solarize_p=0.2, min_fg=min_fg),
    )


def multi_crop_views(
    size: int,
    global_scale: tuple[float, float],
    n_local: int,
    local_size: int,
    local_scale: tuple[float, float],
) -> list[ViewSpec]:
    """DINO's multi-crop: BYOL's two global views, then ``n_local`` small ones (blur p=0.5)."""
    first, second = byol_views(size, min_scale=global_scale[0])
    local = ViewSpec(size=local_size, scale=local_scale, blur_p=0.5, solarize_p=0.0)
    return [first, second, *[local] * n_local]


def moco_v2_views(size: int, min_scale: float = 0.2, weak_key: bool = False) -> list[ViewSpec]:
    """MoCo v2's "aug+" query (crop, jitter 0.4/0.4/0.4/0.1 at p=0.8, grey, blur p=0.5, flip) and
    its key: the same, or with ``weak_key`` a crop and flip only (SegAS's x^k)."""
    strong = ViewSpec(size=size, scale=(min_scale, 1.0), saturation=0.4, blur_p=0.5, solarize_p=0.0)
    weak = ViewSpec(size=size, scale=(min_scale, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    return [strong, weak if weak_key else strong]


class View(NamedTuple):
    """One augmented view and where it came from (SCFS and SegAS need the geometry)."""

    image: torch.Tensor  # uint8 3 x S x S
    mask: torch.Tensor | None  # uint8 1 x S x S soft mask, or None
    box: tuple[int, int, int, int]  # the crop in the source image: top, left, height, width
    flipped: bool


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    # always draw, so that the stream does not depend on p being 0 or 1
    return float(torch.rand((), generator=g)) < p


def sample_crop(
    g: torch.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Inception-style random resized crop ``(top, left, h, w)`` (torchvision's algorithm)."""
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _box_sum(integral: np.ndarray, top: int, left: int, h: int, w: int) -> float:
    return float(
        integral[top + h, left + w] - integral[top, left + w] - integral[top + h, left] + integral[top, left]
    )


def mask_integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of a binary mask (for O(1) foreground fractions of crops)."""
    out = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    out[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    return out


def sample_crop_with_mask(
    g: torch.Generator, spec: ViewSpec, integral: np.ndarray | None, height: int, width: int
) -> tuple[int, int, int, int]:
    """A random crop; with ``spec.min_fg`` > 0, re-sampled until it holds that much foreground.

    Keeps the best of ``recrop_tries`` crops when none reaches the target (an image whose
    object is tiny still trains, on its most object-centred crop).
    """
    crop = sample_crop(g, height, width, spec.scale, spec.ratio)
    if spec.min_fg <= 0 or integral is None or integral[-1, -1] == 0:
        return crop
    best, best_fg = crop, _box_sum(integral, *crop) / (crop[2] * crop[3])
    for _ in range(spec.recrop_tries - 1):
        if best_fg >= spec.min_fg:
            break
        crop = sample_crop(g, height, width, spec.scale, spec.ratio)
        fg = _box_sum(integral, *crop) / (crop[2] * crop[3])
        if fg > best_fg:
            best, best_fg = crop, fg
    return best


def _jitter(g: torch.Generator, spec: ViewSpec, img: Image.Image) -> Image.Image:
    """Colour jitter (random order) and greyscale on the PIL image: PIL's enhancers and HSV
    conversion cost a fifth of the same operations on tensors (hue: 0.7 vs 3.4 ms at 96 px)."""
    if _coin(g, spec.jitter_p):
        order = torch.randperm(4, generator=g).tolist()
        factors = [
            _uniform(g, max(0.0, 1 - spec.brightness), 1 + spec.brightness),
            _uniform(g, max(0.0, 1 - spec.contrast), 1 + spec.contrast),
            _uniform(g, max(0.0, 1 - spec.saturation), 1 + spec.saturation),
            _uniform(g, -spec.hue, spec.hue),
        ]
        for op in order:
            if op == 0 and spec.brightness > 0:
                img = TF.adjust_brightness(img, factors[0])
            elif op == 1 and spec.contrast > 0:
                img = TF.adjust_contrast(img, factors[1])
            elif op == 2 and spec.saturation > 0:
                img = TF.adjust_saturation(img, factors[2])
            elif op == 3 and spec.hue > 0:
                img = TF.adjust_hue(img, factors[3])
    if _coin(g, spec.gray_p):
        img = img.convert("L").convert("RGB")
    return img


def _blur_solarize(g: torch.Generator, spec: ViewSpec, img: torch.Tensor) -> torch.Tensor:
    """Gaussian blur (a true Gaussian kernel, 10 % of the view) and solarisation on the tensor."""
    sigma = _uniform(g, *spec.blur_sigma)
    if _coin(g, spec.blur_p):
        k = max(3, int(0.1 * spec.size) // 2 * 2 + 1)  # BYOL: 23 px at 224
        img = TF.gaussian_blur(img, kernel_size=[k, k], sigma=[sigma, sigma])
    if _coin(g, spec.solarize_p):
        img = TF.solarize(img, threshold=128)
    return img


def make_view(
    g: torch.Generator,
    spec: ViewSpec,
    image: Image.Image,
    mask: Image.Image | None,
    integral: np.ndarray | None = None,
) -> View:
    """One augmented view: image, soft mask (or None), crop box and flip."""
    width, height = image.size
    top, left, h, w = sample_crop_with_mask(g, spec, integral, height, width)
    box = (left, top, left + w, top + h)
    size = (spec.size, spec.size)
    out = image.resize(size, Image.BICUBIC, box=box)
    out_mask = mask.resize(size, Image.BOX, box=box) if mask is not None else None
    flipped = _coin(g, spec.flip_p)
    if flipped:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
        out_mask = out_mask.transpose(Image.FLIP_LEFT_RIGHT) if out_mask is not None else None
    out = _jitter(g, spec, out)
    img_t = torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    img_t = _blur_solarize(g, spec, img_t)
    mask_t = None
    if out_mask is not None:
        mask_t = torch.from_numpy(np.asarray(out_mask, dtype=np.uint8).copy())[None]
    return View(img_t, mask_t, (top, left, h, w), flipped)


def eval_view(image: Image.Image, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Resize the short side to ``size / crop_fraction`` and centre-crop ``size`` (uint8,
    C x S x S; an ``L`` image, e.g. a mask, is resized bilinearly and gives 1 x S x S)."""
    width, height = image.size
    short = int(round(size / crop_fraction))
    scale = short / min(width, height)
    new_w, new_h = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
    resized = image.resize((new_w, new_h), Image.BILINEAR if image.mode == "L" else Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    out = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(out.copy()).reshape(size, size, -1).permute(2, 0, 1).contiguous()
