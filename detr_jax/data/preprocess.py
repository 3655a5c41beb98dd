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
