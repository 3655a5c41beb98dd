"""Preprocessing shared by training, prediction and evaluation (numpy / PIL, outside jit).

Conventions: images are HWC; model inputs are float32 [B, H, W, 3] normalized with the ImageNet
mean and std; `pixel_mask` is bool [B, H, W], True on real pixels (the original DETR uses the
opposite polarity).
"""
from __future__ import annotations

import numpy as np

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
