"""Preprocessing shared by training, prediction and evaluation (numpy / PIL, outside jit).

Conventions: images are HWC; model inputs are float32 [B, H, W, 3] normalized with the ImageNet
mean and std; `pixel_mask` is bool [B, H, W], True on real pixels (the original DETR uses the
opposite polarity).  Sizes are (h, w).

Evaluation pipeline, as the original val transform: `load_image` (the one decoder,
`data/image.py`: any PIL mode -> uint8 RGB, EXIF orientation applied) -> `resize_for_eval` (PIL bilinear to `resized_size`, what torchvision
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

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detr_jax.config import DataConfig
from detr_jax.data.image import ImageLike, ImageLoadError, decode_image  # noqa: F401 (ImageLoadError: re-exported)

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

def load_image(image: ImageLike, *, max_pixels: Optional[int] = DataConfig.max_image_pixels,
               background: Optional[Tuple[int, int, int]] = None) -> np.ndarray:
    """A path, encoded bytes, PIL image or array -> uint8 RGB [H, W, 3], as inference sees it:
    `detr_jax.data.image.decode_image` with the EXIF orientation applied (the original DETR does
    not apply it).  Every PIL mode is accepted, 16-bit grey scaled; alpha dropped unless
    `background` (r, g, b) is given.  Raises `ImageLoadError` for a missing, unreadable,
    truncated or empty image, and for one of more than `max_pixels` pixels."""
    return decode_image(image, max_pixels=max_pixels, background=background)


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
