"""Decoding every awkward kind of file real datasets hold, and refusing the broken ones."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import exif_rotated_jpeg, gradient_rgb, jpeg_bytes, png_bytes, png_with_forged_size
from PIL import Image

from maskgen.imaging import ImageDecodeError, decode_image, encode_gray_png, encode_jpeg, load_binary_mask


def test_plain_rgb_jpeg_keeps_original_bytes():
    arr = gradient_rgb(30, 40)
    dec = decode_image(jpeg_bytes(arr))
    assert dec.rgb.shape == (30, 40, 3) and dec.reencode_reason is None and not dec.grayscale


def test_grayscale_jpeg_is_kept_and_expanded_for_the_method():
    dec = decode_image(jpeg_bytes(gradient_rgb(20, 25)[:, :, 0]))
    assert dec.grayscale and dec.reencode_reason is None
    assert dec.rgb.shape == (20, 25, 3) and (dec.rgb[:, :, 0] == dec.rgb[:, :, 2]).all()


def test_cmyk_jpeg_is_converted_and_reencoded():
    buf = io.BytesIO()
    Image.fromarray(gradient_rgb(16, 16)).convert("CMYK").save(buf, format="JPEG")
    dec = decode_image(buf.getvalue())
    assert dec.rgb.shape == (16, 16, 3) and dec.reencode_reason == "mode:CMYK"


def test_16bit_png_is_scaled_to_8bit():
    arr16 = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500).astype(np.uint16)
    dec = decode_image(png_bytes(Image.fromarray(arr16)))
    expected = np.rint(arr16 / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(dec.rgb[:, :, 1], expected)
    assert dec.grayscale and dec.reencode_reason == "format:PNG"


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1"])
def test_other_png_modes(mode):
    img = Image.fromarray(gradient_rgb(9, 11)).convert(mode)
    dec = decode_image(png_bytes(img))
    assert dec.rgb.shape == (9, 11, 3) and dec.rgb.dtype == np.uint8


def test_one_pixel_image():
    dec = decode_image(png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))))
    assert dec.rgb.shape == (1, 1, 3) and tuple(dec.rgb[0, 0]) == (10, 20, 30)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_and_forces_reencoding(orientation):
    stored = gradient_rgb(20, 30)  # stored landscape
    dec = decode_image(exif_rotated_jpeg(stored, orientation))
    assert dec.reencode_reason == f"exif_orientation:{orientation}"
    upright = {3: np.rot90(stored, 2), 6: np.rot90(stored, -1), 8: np.rot90(stored, 1)}[orientation]
    assert dec.rgb.shape == upright.shape
    assert np.abs(dec.rgb.astype(int) - upright.astype(int)).mean() < 6  # JPEG loss only


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"this is not an image\n", "not_an_image"),
        (jpeg_bytes(gradient_rgb(64, 64))[:-700], "truncated_or_corrupt"),
        (png_with_forged_size(40000, 40000), "decompression_bomb"),
    ],
)
def test_bad_inputs_raise_with_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason


def test_bomb_limit_is_configurable():
    data = png_bytes(Image.new("L", (100, 100)))
    with pytest.raises(ImageDecodeError, match="decompression_bomb"):
        decode_image(data, max_pixels=9_999)
    assert decode_image(data, max_pixels=10_000).rgb.shape == (100, 100, 3)


def test_encoders_round_trip():
    mask = (gradient_rgb(10, 12)[:, :, 0] > 128).astype(np.uint8) * 255
    back = np.asarray(Image.open(io.BytesIO(encode_gray_png(mask))))
    np.testing.assert_array_equal(back, mask)
    assert encode_gray_png(mask) == encode_gray_png(mask.copy())  # deterministic
    jpg = encode_jpeg(gradient_rgb(10, 12), grayscale=True)
    assert Image.open(io.BytesIO(jpg)).mode == "L"


def test_ground_truth_binarised_above_127():
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    np.testing.assert_array_equal(
        load_binary_mask(png_bytes(Image.fromarray(grey))), [[False, False, True, True]]
    )


def test_fast_mask_png_decodes_to_the_same_pixels_everywhere():
    import cv2

    from maskgen.imaging import encode_mask_png

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 7), (375, 500)]:
        mask = (rng.random(shape) > 0.5).astype(np.uint8) * 255
        data = encode_mask_png(mask)
        pil = Image.open(io.BytesIO(data))
        assert pil.mode == "L" and pil.size == shape[::-1]
        np.testing.assert_array_equal(np.asarray(pil), mask)
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), mask)
        assert data == encode_mask_png(mask.copy())
