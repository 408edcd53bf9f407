"""Image decoding and encoding for the build: robust to the files real datasets contain.

Decoding applies the EXIF orientation, converts every mode (CMYK, 16-bit, palette, RGBA,
grey) to 8-bit RGB for the mask method, and decides whether the original bytes can be
stored as they are. A JPEG is kept byte-for-byte only when any reader would show the same
pixels as the mask was computed on: RGB or grey, and no EXIF rotation. Everything else is
encoded once to JPEG (quality 95) and recorded as ``reencoded``.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps

from maskio.shard_format import JPEG_QUALITY, MAX_PIXELS

# PIL's own default bomb limit (about 89.5 MP); checked from the header before decoding.
DEFAULT_MAX_PIXELS = MAX_PIXELS  # PIL's default limit, one definition for every reader
Image.MAX_IMAGE_PIXELS = None  # we enforce our own limit, with a clear message
_EXIF_ORIENTATION = 0x0112


class ImageDecodeError(Exception):
    """An input that cannot be used; ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    rgb: np.ndarray | None  # H x W x 3 uint8, upright; None when the pixels were left to the method
    grayscale: bool  # the source had a single channel
    format: str  # PIL format name, e.g. "JPEG", "PNG"
    reencode_reason: str | None  # None when the original bytes can be stored as they are
    shape: tuple[int, int]  # upright height and width


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, pixels: bool = True) -> DecodedImage:
    """Decode image bytes to upright 8-bit RGB, raising ImageDecodeError with a reason.

    ``pixels=False`` reads only the header of a plain JPEG (RGB or grey, no EXIF rotation) and
    returns ``rgb=None``, for a method that decodes the bytes itself (on a GPU); every other
    file is decoded as usual. A corrupt JPEG body is then found by that method's decoder.
    """
    if not data:
        raise ImageDecodeError("empty_file")
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises several types for garbage input
        raise ImageDecodeError("not_an_image", str(exc)) from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError("bad_size", f"{w}x{h}")
        if w * h > max_pixels:
            raise ImageDecodeError("decompression_bomb", f"{w}x{h} pixels exceeds the limit of {max_pixels}")
        fmt = im.format or "unknown"
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:
            orientation = 1
        mode = im.mode
        grayscale = mode in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1")
        reason = None
        if fmt != "JPEG":
            reason = f"format:{fmt}"
        elif mode not in ("RGB", "L"):
            reason = f"mode:{mode}"
        elif orientation not in (1, None):
            reason = f"exif_orientation:{orientation}"
        if not pixels and reason is None:  # a plain JPEG: its bytes are all the method needs
            return DecodedImage(None, grayscale, fmt, None, (h, w))
        try:
            im.load()
        except Exception as exc:
            raise ImageDecodeError("truncated_or_corrupt", str(exc)) from None
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
        rgb = _to_rgb8(im)
    return DecodedImage(rgb=rgb, grayscale=grayscale, format=fmt, reencode_reason=reason, shape=rgb.shape[:2])


def _to_rgb8(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(im))


def encode_jpeg(rgb: np.ndarray, grayscale: bool = False) -> bytes:
    """Encode once to JPEG at the contract's quality; grey sources stay single-channel."""
    arr = rgb[:, :, 0] if grayscale else rgb
    im = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_gray_png(arr: np.ndarray) -> bytes:
    """Deterministic 8-bit single-channel PNG (mask or saliency map)."""
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(arr, dtype=np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 3]
    )
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_mask_png(mask: np.ndarray) -> bytes:
    """8-bit single-channel PNG for a 0/255 mask, written directly: no per-row filters, zlib RLE.

    Masks are long runs of 0 and 255, which run-length deflate compresses about as well as
    the adaptive filters of a general PNG encoder, at a fifth of the time (the mask encode
    was the largest cost of a center-method build).
    """
    arr = np.ascontiguousarray(mask, dtype=np.uint8)
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {arr.shape}")
    h, w = arr.shape
    rows = np.zeros((h, w + 1), np.uint8)  # a leading 0 per row: filter type "None"
    rows[:, 1:] = arr
    comp = zlib.compressobj(6, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    idat = comp.compress(rows.tobytes()) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return _PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def load_binary_mask(data: bytes) -> np.ndarray:
    """Ground-truth mask bytes -> bool array; grey levels binarised at > 127 (toolbox convention).

    Colour masks are converted to grey first; 16-bit masks are scaled to 8 bits.
    """
    dec = decode_image(data)
    return (
        dec.rgb[:, :, 0] > 127 if dec.grayscale else np.asarray(Image.fromarray(dec.rgb).convert("L")) > 127
    )
