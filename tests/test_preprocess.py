"""Preprocessing: image loading in every PIL mode, the original's eval resize, buckets, batches."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import reference_arrays, reference_path
from detr_jax.config import DataConfig
from detr_jax.data.preprocess import (ImageLoadError, bucket_shape, group_by_bucket, load_image, normalize,
                                      preprocess_images, resize_for_eval, resized_size)


def _nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


# ---------------------------------------------------------------- the original's eval transform

def test_resize_reproduces_the_original_bit_exactly():
    ref = reference_arrays("forward_single.npz", ["image_orig_uint8_0", "image_resized_uint8_0"])
    ours = resize_for_eval(ref["image_orig_uint8_0"], 320, 533)
    np.testing.assert_array_equal(ours, ref["image_resized_uint8_0"])


@pytest.mark.parametrize("case, photos, short, max_size", [
    ("single", ["chelsea"], 320, 533),
    ("batch", ["coffee", "astronaut"], 320, 533),
    ("large", ["motorcycle_left"], 800, 1333),
])
def test_photos_give_the_stored_model_inputs(case, photos, short, max_size):
    ref = reference_arrays(f"forward_{case}.npz", ["input", "pixel_mask", "image_sizes", "orig_sizes"])
    paths = [reference_path(f"photos/{p}.png") for p in photos]
    pixel_values, pixel_mask, image_sizes, orig_sizes = preprocess_images(paths, short, max_size, multiple=None)
    np.testing.assert_allclose(pixel_values, _nhwc(ref["input"]), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pixel_mask, ~ref["pixel_mask"])  # the original marks padding
    np.testing.assert_array_equal(image_sizes, ref["image_sizes"])
    np.testing.assert_array_equal(orig_sizes, ref["orig_sizes"])


def test_bucketed_batch_holds_the_same_pixels_and_zero_padding():
    ref = reference_arrays("forward_batch.npz", ["input"])
    paths = [reference_path(f"photos/{p}.png") for p in ("coffee", "astronaut")]
    pixel_values, pixel_mask, image_sizes, _ = preprocess_images(paths, 320, 533, multiple=128)
    assert pixel_values.shape == (2, 384, 512, 3) and pixel_values.dtype == np.float32
    np.testing.assert_allclose(pixel_values[:, :320, :480], _nhwc(ref["input"]), atol=1e-5)
    for b, (h, w) in enumerate(image_sizes):
        assert pixel_mask[b, :h, :w].all() and not pixel_mask[b].sum() - h * w
        assert not pixel_values[b][~pixel_mask[b]].any()


def test_an_image_already_at_the_target_size_is_untouched():
    image = np.random.default_rng(0).integers(0, 256, (320, 400, 3), dtype=np.uint8)
    assert resize_for_eval(image, 320, 1333) is image
    assert resize_for_eval(image, 160, 1333).shape == (160, 200, 3)


# ---------------------------------------------------------------- buckets

def test_bucket_shape_rounds_each_side_up():
    assert bucket_shape(800, 1066, 128) == (896, 1152)
    assert bucket_shape(896, 1024, 128) == (896, 1024)
    assert bucket_shape(801, 1, 64) == (832, 64)
    assert bucket_shape(321, 479, None) == (321, 479)


def test_buckets_at_800_1333_are_the_documented_set():
    """Aspect ratios 1:2 .. 2:1 give 11 padded shapes with a multiple of 128 (module docstring)."""
    shapes = set()
    for long_side in range(1000, 2001):
        for h, w in ((1000, long_side), (long_side, 1000)):
            shapes.add(bucket_shape(*resized_size(h, w, 800, 1333), DataConfig.bucket_multiple))
    sides = (896, 1024, 1152, 1280, 1408)
    expected = {(896, s) for s in sides} | {(s, 896) for s in sides} | {(768, 1408), (1408, 768)}
    assert shapes == expected


def test_group_by_bucket_batches_one_shape_each():
    sizes = [(480, 640), (500, 750), (640, 480), (480, 640), (480, 641), (333, 500)]
    groups = group_by_bucket(sizes, 2, short_side=800, max_size=1333, multiple=128)
    assert groups == [((896, 1152), [0, 3]), ((896, 1152), [4]), ((896, 1280), [1, 5]), ((1152, 896), [2])]


# ---------------------------------------------------------------- loading

def _png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


RGB = np.random.default_rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)


def test_load_rgb_path_pil_bytes_and_array(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(RGB).save(path)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(RGB), RGB):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
        np.testing.assert_array_equal(out, RGB)


def test_load_grey_8_and_16_bit():
    grey = RGB[..., 0]
    np.testing.assert_array_equal(load_image(_png_bytes(Image.fromarray(grey))), np.stack([grey] * 3, -1))
    deep = grey.astype(np.uint16) * 257 + 100  # 16-bit: scaled to 8 bits, not clipped
    out = load_image(_png_bytes(Image.fromarray(deep)))
    np.testing.assert_array_equal(out[..., 0], np.round(deep / 257).astype(np.uint8))


def test_load_alpha_is_dropped_or_composited():
    rgba = np.concatenate([RGB, np.zeros((6, 8, 1), np.uint8)], -1)  # fully transparent
    data = _png_bytes(Image.fromarray(rgba))
    np.testing.assert_array_equal(load_image(data), RGB)
    assert (load_image(data, background=(255, 255, 255)) == 255).all()
    la = Image.fromarray(RGB[..., 0]).convert("LA")
    np.testing.assert_array_equal(load_image(la)[..., 1], RGB[..., 0])


def test_load_palette_with_transparency_and_cmyk():
    palette = Image.fromarray(RGB).quantize(16)
    palette.info["transparency"] = 0
    expected = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(load_image(_png_bytes(palette)), expected)
    cmyk = Image.fromarray(RGB).convert("CMYK")
    np.testing.assert_array_equal(load_image(_png_bytes(cmyk, format="TIFF")), np.asarray(cmyk.convert("RGB")))


def test_load_applies_exif_orientation():
    image = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert load_image(_png_bytes(image, format="JPEG", exif=exif.tobytes())).shape == (20, 10, 3)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("source, reason", [
    (b"", "not an image"),
    (b"definitely not an image", "not an image"),
    ("/no/such/file.jpg", "no such file"),
    (np.zeros((0, 4, 3), np.uint8), "zero size"),
    (np.zeros((4, 4, 3), np.float32), "expected uint8"),
    (_png_header_only(13000, 12000), "max_image_pixels"),  # above ours, below PIL's own limit
    (_png_header_only(50000, 50000), "decompression bomb"),
])
def test_load_errors_name_the_reason(source, reason):
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(source)
    assert isinstance(info.value, OSError) and info.value.reason


def test_load_truncated_file(tmp_path):
    data = _png_bytes(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(path)
    assert info.value.path == str(path)


def test_max_pixels_is_configurable():
    with pytest.raises(ImageLoadError, match="48 pixels"):
        load_image(RGB, max_pixels=47)
    assert load_image(RGB, max_pixels=None).shape == (6, 8, 3)


def test_normalize_is_the_float32_formula():
    x = normalize(RGB)
    np.testing.assert_allclose(x[0, 0, 0], (RGB[0, 0, 0] / 255 - 0.485) / 0.229, rtol=1e-6)
