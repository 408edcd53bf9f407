"""Deterministic synthetic scenes with exact foreground masks and class labels.

Each scene is a function of ``(seed, index)`` alone, so any range can be generated lazily
in any worker. A scene is a natural-looking textured background (real textures shipped
with scikit-image, recoloured and mixed with fractal noise and a light gradient) with one
foreground object: one of six shapes drawn with one of five appearance kinds (both are
returned; either can be the class label), at a random size, rotation and position; about a fifth of the objects are cut by
the image border. Camera-like blur and noise are applied to the whole picture, so object
edges are not artificially crisp, while the mask stays the exact drawn region.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring", "blob")
APPEARANCES = ("shaded", "stripes", "checker", "noise", "photo")
BORDER_TOUCH_P = 0.2
MIN_SIZE, MAX_SIZE = 160, 320
MIN_FG, MAX_FG = 0.03, 0.6


class SceneClasses(NamedTuple):
    """A scene's two labellings: the object's silhouette and its surface appearance."""

    shape: int
    appearance: int


def skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


@functools.cache
def _texture(name: str) -> np.ndarray:
    """A scikit-image texture or photo as float32 grey in [0, 1], or RGB when ``name`` is colour."""
    img = cv2.imread(str(skimage_data_dir() / name), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(f"scikit-image data file {name} is missing")
    if img.ndim == 3:
        img = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)
    return img.astype(np.float32) / 255.0


BACKGROUND_TEXTURES = ("grass.png", "gravel.png", "brick.png")
PHOTO_TEXTURES = ("coffee.png", "chelsea.png", "astronaut.png", "ihc.png", "motorcycle_left.png")


def _draw_crop(rng: np.random.Generator, H: int, W: int) -> tuple[int, int, int, int]:
    """A random window ``(y, x, height, width)`` covering 35-100 % of each side of an H x W image."""
    scale = rng.uniform(0.35, 1.0)
    ch, cw = max(8, int(H * scale)), max(8, int(W * scale))
    y = int(rng.integers(0, H - ch + 1))
    x = int(rng.integers(0, W - cw + 1))
    return y, x, ch, cw


def _paint_crop(img: np.ndarray, window: tuple[int, int, int, int], h: int, w: int) -> np.ndarray:
    y, x, ch, cw = window
    return cv2.resize(img[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def _draw_noise(rng: np.random.Generator, octaves: int = 5) -> list[np.ndarray]:
    return [rng.random((2 ** (o + 2),) * 2).astype(np.float32) for o in range(octaves)]


def _paint_noise(grids: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Fractal noise in [0, 1]: the octave grids upsampled and summed with amplitude 0.55^o."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for grid in grids:
        out += amp * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.55
    out /= total
    return (out - out.min()) / (out.max() - out.min() + 1e-6)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(40, 230), rng.uniform(50, 240)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _colorize(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    return c1[None, None, :] * (1.0 - t[:, :, None]) + c2[None, None, :] * t[:, :, None]


def _draw_background(rng: np.random.Generator) -> dict[str, Any]:
    """Every random choice of a background; painting it (:func:`_paint_background`) draws none.

    Kept apart so that a scene's classes can be listed without painting its pixels.
    """
    name = BACKGROUND_TEXTURES[int(rng.integers(len(BACKGROUND_TEXTURES)))]
    H, W = _texture(name).shape[:2]
    return {
        "texture": name,
        "window": _draw_crop(rng, H, W),
        "noise": _draw_noise(rng),
        "mix": rng.uniform(0.3, 0.8),
        "colors": (_random_color(rng), _random_color(rng)),
        "angle": rng.uniform(0, 2 * np.pi),
        "gradient": rng.uniform(0.0, 0.35),
    }


def _paint_background(p: dict[str, Any], h: int, w: int) -> np.ndarray:
    t = _paint_crop(_texture(p["texture"]), p["window"], h, w)
    t = p["mix"] * t + (1 - p["mix"]) * _paint_noise(p["noise"], h, w)
    bg = _colorize(t, *p["colors"])
    # large-scale illumination gradient
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = p["angle"]
    grad = (np.cos(ang) * gx / w + np.sin(ang) * gy / h) * p["gradient"]
    return np.clip(bg * (1.0 + grad - grad.mean())[:, :, None], 0, 1)


def _appearance(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    c1, c2 = _random_color(rng), _random_color(rng)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "shaded":
        ang = rng.uniform(0, 2 * np.pi)
        t = (np.cos(ang) * gx / w + np.sin(ang) * gy / h) * 0.5 + 0.5
        return _colorize(np.clip(t * rng.uniform(0.2, 0.6), 0, 1), c1, c2)
    if kind == "stripes":
        ang = rng.uniform(0, np.pi)
        period = rng.uniform(6, 24)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(ang) * gx + np.sin(ang) * gy) / period)
        return _colorize(t, c1, c2)
    if kind == "checker":
        cell = int(rng.integers(6, 20))
        t = (((gx // cell) + (gy // cell)) % 2).astype(np.float32)
        return _colorize(t, c1, c2)
    if kind == "noise":
        return _colorize(_paint_noise(_draw_noise(rng, octaves=6), h, w), c1, c2)
    photo = _texture(PHOTO_TEXTURES[int(rng.integers(len(PHOTO_TEXTURES)))])
    return _paint_crop(photo, _draw_crop(rng, *photo.shape[:2]), h, w)


def _polygon(cx: float, cy: float, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return np.round(pts).astype(np.int32)


def _touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def _shape_mask(rng: np.random.Generator, shape: str, h: int, w: int, at_border: bool) -> np.ndarray:
    area = rng.uniform(0.04, 0.40) * h * w
    r = float(np.sqrt(area / np.pi))
    if at_border:  # centre close to an edge: the object is cut by the border
        side = int(rng.integers(4))
        off = rng.uniform(0.0, 0.6) * r
        cx = [off, w - off, rng.uniform(0, w), rng.uniform(0, w)][side]
        cy = [rng.uniform(0, h), rng.uniform(0, h), off, h - off][side]
    else:
        cx = rng.uniform(min(r, w / 2), max(w - r, w / 2))
        cy = rng.uniform(min(r, h / 2), max(h - r, h / 2))
    rot = rng.uniform(0, 2 * np.pi)
    canvas = np.zeros((h, w), np.uint8)
    if shape in ("ellipse", "ring"):
        s = rng.uniform(0.6, 1.6)
        axes = (max(2, int(r * s)), max(2, int(r / s)))
        center = (int(round(cx)), int(round(cy)))
        cv2.ellipse(canvas, center, axes, np.degrees(rot), 0, 360, 1, thickness=-1)
        if shape == "ring":
            k = rng.uniform(0.4, 0.65)
            inner = (max(1, int(axes[0] * k)), max(1, int(axes[1] * k)))
            cv2.ellipse(canvas, center, inner, np.degrees(rot), 0, 360, 0, thickness=-1)
    elif shape == "rectangle":
        s = rng.uniform(0.6, 1.6)
        side = r * np.sqrt(np.pi)
        box = cv2.boxPoints(((cx, cy), (side * s, side / s), np.degrees(rot)))
        cv2.fillPoly(canvas, [np.round(box).astype(np.int32)], 1)
    elif shape == "triangle":
        ang = rot + np.arange(3) * 2 * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        cv2.fillPoly(canvas, [_polygon(cx, cy, r * rng.uniform(1.1, 1.6, 3), ang)], 1)
    elif shape == "star":
        k = int(rng.integers(5, 8))
        ang = rot + np.arange(2 * k) * np.pi / k
        radii = np.where(np.arange(2 * k) % 2 == 0, 1.5 * r, 1.5 * r * rng.uniform(0.35, 0.55))
        cv2.fillPoly(canvas, [_polygon(cx, cy, radii, ang)], 1)
    else:  # blob: a smooth random radial function
        ang = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        radii = np.ones_like(ang)
        for k in range(2, 6):
            radii += rng.uniform(0, 0.18) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
        cv2.fillPoly(canvas, [_polygon(cx, cy, r * radii, ang)], 1)
    return canvas.astype(bool)


@dataclass
class _ScenePlan:
    """A scene's draws up to its appearance kind; ``rng`` continues with the painting draws."""

    rng: np.random.Generator
    mask: np.ndarray
    shape: int
    background: dict[str, Any]
    appearance: int


def _plan_scene(seed: int, index: int) -> _ScenePlan:
    rng = np.random.default_rng([int(seed), int(index)])
    h = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    w = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    shape = int(rng.integers(len(SHAPES)))
    at_border = bool(rng.random() < BORDER_TOUCH_P)
    for _ in range(30):  # redraw until the size is sane and the border contact is as drawn
        mask = _shape_mask(rng, SHAPES[shape], h, w, at_border)
        if MIN_FG <= mask.mean() <= MAX_FG and _touches_border(mask) == at_border:
            break
    background = _draw_background(rng)
    appearance = int(rng.integers(len(APPEARANCES)))
    return _ScenePlan(rng, mask, shape, background, appearance)


def scene_classes(seed: int, index: int) -> SceneClasses:
    """The classes of scene ``index`` without painting it (far cheaper than rendering)."""
    plan = _plan_scene(seed, index)
    return SceneClasses(plan.shape, plan.appearance)


def render_scene(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, SceneClasses]:
    """Scene ``index`` of the stream ``seed``: (RGB uint8, bool mask, its classes)."""
    plan = _plan_scene(seed, index)
    rng, mask = plan.rng, plan.mask
    h, w = mask.shape
    bg = _paint_background(plan.background, h, w)
    fg = _appearance(rng, APPEARANCES[plan.appearance], h, w)
    img = np.where(mask[:, :, None], fg, bg)
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0, rng.uniform(0.0, 0.03), img.shape).astype(np.float32)
    rgb = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return rgb, mask, SceneClasses(plan.shape, plan.appearance)
