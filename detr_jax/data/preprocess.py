"""Preprocessing shared by training, prediction and evaluation (numpy / PIL, outside jit).

Conventions: images are HWC; model inputs are float32 [B, H, W, 3] normalized with the ImageNet
mean and std; `pixel_mask` is bool [B, H, W], True on real pixels (the original DETR uses the
opposite polarity).  Sizes are (h, w).

Evaluation pipeline, as the original val transform: `load_image` (any PIL mode -> uint8 RGB,
EXIF orientation applied) -> `resize_for_eval` (PIL bilinear to `resized_size`, what torchvision
does on a PIL image) -> `normalize` -> padded at the bottom/right to a bucket shape
(`preprocess_images` does all of it).

Buckets.  A batch is padded to `bucket_shape`: each side rounded up to a multiple of
`DataConfig.bucket_multiple`, so that a folder of photos of many sizes compiles only a few
shapes; the model's padding-invariant mode makes the padding irrelevant to the results.  At
800/1333 and a multiple of 128, a landscape photo of aspect w/h <= 1333/800 becomes 800 x (800..1333)
-> 896 x {896, 1024, 1152, 1280, 1408}; portraits give the 4 mirrored shapes; wider panoramas
lower the short side: 768 x 1408 for aspects in (1.74, 2.08], 640 x 1408 up to 2.6, ...  So
aspects between 1:2 and 2:1 give 11 shapes.  The trade-off, measured over those aspects: a
multiple of 128 costs 18 % padded pixels for 11 shapes; 64 costs 6 % for 21 shapes, 32 costs 2 %
for 43.  A compilation of the R50 model takes longer than running some hundreds of images, so we
keep 128 (`group_by_bucket` then sorts a folder into batches of one shape each).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from detr_jax.config import DataConfig

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3]: `(x / 255 - mean) / std`, in float32 like torchvision."""
    x = image_uint8.astype(np.float32) / np.float32(255)
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def resized_size(height: int, width: int, short_side: int, max_size: int | None) -> tuple[int, int]:
    """(h, w) after the DETR resize: short side -> `short_side`, long side capped at `max_size`.

    Same rounding as the original transforms: the cap lowers the short side to
    `round(max_size * short / long)`, and the long side is truncated, `int(short_side * long / short)`.
    An image whose short side already has the target size is left as it is.
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * short_side > max_size:
        short_side = int(round(max_size * short / long))
    if short == short_side:
        return height, width
    if width < height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def pad_batch(images: list[np.ndarray], shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack HWC float images, zero-padded at the bottom and right to `shape` (default: the max).

    Returns (pixel_values float32 [B, H, W, C], pixel_mask bool [B, H, W], True on real pixels).
    """
    if shape is None:
        shape = (max(im.shape[0] for im in images), max(im.shape[1] for im in images))
    height, width = shape
    channels = images[0].shape[2]
    pixel_values = np.zeros((len(images), height, width, channels), np.float32)
    pixel_mask = np.zeros((len(images), height, width), bool)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        if h > height or w > width:
            raise ValueError(f"image {i} of size {h}x{w} does not fit the padded shape {height}x{width}")
        pixel_values[i, :h, :w] = im
        pixel_mask[i, :h, :w] = True
    return pixel_values, pixel_mask


def bucket_shape(height: int, width: int, multiple: Optional[int]) -> Tuple[int, int]:
    """(height, width) each rounded up to a multiple of `multiple` (None or 1: unchanged)."""
    if not multiple or multiple == 1:
        return int(height), int(width)
    return -(-int(height) // multiple) * multiple, -(-int(width) // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Loading

ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


class ImageLoadError(OSError):
    """An image that cannot be used: missing, not an image, truncated, empty or too large."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot load image {path}: {reason}")
        self.path, self.reason = path, reason


def _check_size(path, width: int, height: int, max_pixels: Optional[int]) -> None:
    if width <= 0 or height <= 0:
        raise ImageLoadError(path, f"it has zero size ({width} x {height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(path, f"{width} x {height} = {width * height} pixels is more than "
                                   f"max_image_pixels = {max_pixels} (a decompression bomb?)")


def _to_rgb(image: Image.Image, background: Optional[Tuple[int, int, int]]) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3].  16/32-bit grey is scaled to 8 bits (PIL would clip it);
    transparency is dropped (as `convert("RGB")`, what the original's data loader does) or, with
    `background`, composited onto that colour."""
    if image.mode.startswith("I"):  # I;16* and I: 16-bit range (I holding only 0..255 kept as is)
        grey = np.asarray(image, dtype=np.float64)
        grey = grey / 257.0 if image.mode != "I" or grey.max(initial=0) > 255 else grey
        grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "F":  # float images: [0, 1] if they fit, else taken as 0..255
        grey = np.asarray(image, dtype=np.float64)
        grey = grey * 255.0 if np.nanmax(grey, initial=0) <= 1.0 else grey
        grey = np.clip(np.round(np.nan_to_num(grey)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        image = image.convert("RGBA")
        if background is not None:
            canvas = Image.new("RGBA", image.size, tuple(background) + (255,))
            image = Image.alpha_composite(canvas, image)
    return np.asarray(image.convert("RGB"))


def load_image(image: ImageLike, *, max_pixels: Optional[int] = DataConfig.max_image_pixels,
               background: Optional[Tuple[int, int, int]] = None) -> np.ndarray:
    """A path, encoded bytes, PIL image or array -> uint8 RGB [H, W, 3].

    Every PIL mode is accepted (RGB, L, I;16, RGBA, LA, P with transparency, CMYK, ...); alpha is
    dropped unless `background` (r, g, b) is given, in which case it is composited onto it; the
    EXIF orientation is applied (the original DETR does not); multi-frame files give their first
    frame.  Arrays must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].  Raises
    `ImageLoadError` for a missing, unreadable, truncated or empty image, and for one of more than
    `max_pixels` pixels (checked from the header, before decoding).
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, "<array>", max_pixels)
    name = "<PIL image>" if isinstance(image, Image.Image) else "<bytes>" if isinstance(image, (bytes, bytearray)) \
        else os.fspath(image)
    if isinstance(image, (str, os.PathLike)) and not os.path.isfile(name):
        raise ImageLoadError(name, "no such file")
    try:
        with warnings.catch_warnings():  # our own max_pixels replaces PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(image, Image.Image):
                return _decode(image, name, max_pixels, background)
            with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else name) as opened:
                return _decode(opened, name, max_pixels, background)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"PIL refuses it as a decompression bomb ({error})") from None
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file that PIL can read") from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated, corrupt, unsupported mode
        raise ImageLoadError(name, f"truncated, corrupt or unsupported ({error})") from None


def _decode(image: Image.Image, name, max_pixels, background) -> np.ndarray:
    _check_size(name, image.width, image.height, max_pixels)
    image.load()
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image, background)


def _array_to_rgb(array: np.ndarray, name, max_pixels) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageLoadError(name, f"expected uint8 [H, W], [H, W, 1|3|4]; got {array.dtype} {array.shape}")
    _check_size(name, array.shape[1], array.shape[0], max_pixels)
    if array.ndim == 2 or array.shape[2] == 1:
        return np.repeat(array.reshape(array.shape[:2] + (1,)), 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


# ----------------------------------------------------------------------------------------------
# Resizing, batching

def resize_for_eval(image_uint8: np.ndarray, short_side: int, max_size: Optional[int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] at `resized_size`, PIL bilinear (torchvision on PIL)."""
    height, width = image_uint8.shape[:2]
    h, w = resized_size(height, width, short_side, max_size)
    if (h, w) == (height, width):
        return image_uint8
    return np.asarray(Image.fromarray(image_uint8).resize((w, h), Image.BILINEAR))


def group_by_bucket(sizes: Sequence[Tuple[int, int]], batch_size: int, *, short_side: int, max_size: Optional[int],
                    multiple: Optional[int]) -> List[Tuple[Tuple[int, int], List[int]]]:
    """Group images (original (h, w) sizes) into batches whose members share a bucket shape.

    Returns [(bucket (H, W), [indices])], buckets in first-appearance order, indices ascending,
    at most `batch_size` per batch.
    """
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(bucket_shape(*resized_size(int(h), int(w), short_side, max_size), multiple), []).append(i)
    return [(shape, idx[k:k + batch_size]) for shape, idx in groups.items() for k in range(0, len(idx), batch_size)]


def preprocess_images(images: Sequence[ImageLike], short_side: int = DataConfig.short_side,
                      max_size: Optional[int] = DataConfig.max_size,
                      multiple: Optional[int] = DataConfig.bucket_multiple) -> Tuple[np.ndarray, ...]:
    """Load, resize, normalize and pad a batch.

    Returns (pixel_values float32 [B, H, W, 3], pixel_mask bool [B, H, W] True on real pixels,
    image_sizes int32 [B, 2] (h, w) after resize, orig_sizes int32 [B, 2]), where (H, W) is the
    bucket of the largest resized image (`multiple=None`: the plain maximum).
    """
    originals = [load_image(im) for im in images]
    resized = [resize_for_eval(im, short_side, max_size) for im in originals]
    image_sizes = np.array([im.shape[:2] for im in resized], np.int32).reshape(-1, 2)
    shape = bucket_shape(*image_sizes.max(0), multiple)
    pixel_values, pixel_mask = pad_batch([normalize(im) for im in resized], shape)
    orig_sizes = np.array([im.shape[:2] for im in originals], np.int32).reshape(-1, 2)
    return pixel_values, pixel_mask, image_sizes, orig_sizes
