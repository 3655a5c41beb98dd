"""DETR's training and evaluation transforms on numpy records (see `coco.py` for the record).

Geometric steps take a record with `image` uint8 [H, W, 3] and `boxes` xyxy in absolute pixels,
and return a new record (inputs are not modified).  Images are resized bilinearly with PIL (as
torchvision does on PIL images), masks with nearest neighbour (the original's
`interpolate(mode="nearest") > 0.5`).  `finalize` ends every pipeline: the image becomes float32
normalized and the boxes normalized (cx, cy, w, h) relative to the unpadded transformed image;
`image_size` int32 [2] is its (h, w).

Training (`TrainTransform`, the original's parameters from DataConfig):
    flip with p = hflip_prob; then with p = crop_prob
    [resize(crop_resize_scales), random_size_crop(crop_min_size, crop_max_size),
    resize(train_scales, train_max_size)], else resize(train_scales, train_max_size).
Evaluation (`EvalTransform`): resize(short_side, max_size).
Every random choice is drawn from the numpy Generator passed in.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detr_jax.config import DataConfig
from detr_jax.data.coco import OBJECT_FIELDS
from detr_jax.data.preprocess import normalize, resized_size

Record = Dict[str, np.ndarray]


def _select(record: Record, keep: np.ndarray) -> Record:
    return {k: (v[keep] if k in OBJECT_FIELDS else v) for k, v in record.items()}


def resize_masks_nearest(masks: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """bool [N, H, W] -> bool [N, h, w]: PyTorch's legacy "nearest", src = floor(dst * in / out)."""
    (h_in, w_in), (h, w) = masks.shape[1:], size
    rows = np.minimum(np.floor(np.arange(h, dtype=np.float32) * np.float32(h_in / h)).astype(int), h_in - 1)
    cols = np.minimum(np.floor(np.arange(w, dtype=np.float32) * np.float32(w_in / w)).astype(int), w_in - 1)
    return masks[:, rows][:, :, cols]  # two 1-D gathers: about twice as fast as one 2-D gather


def resize_to(record: Record, size: Tuple[int, int]) -> Record:
    """Resize to (h, w): image bilinear, boxes and area scaled, masks nearest."""
    image = record["image"]
    (h0, w0), (h, w) = image.shape[:2], size
    out = dict(record)
    if (h, w) != (h0, w0):
        out["image"] = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    rw, rh = w / w0, h / h0
    out["boxes"] = (record["boxes"] * np.array([rw, rh, rw, rh], np.float32)).astype(np.float32)
    if "area" in record:
        out["area"] = (record["area"] * np.float32(rw * rh)).astype(np.float32)
    if "masks" in record:
        out["masks"] = resize_masks_nearest(record["masks"], (h, w))
    return out


def resize(record: Record, short_side: int, max_size: Optional[int] = None) -> Record:
    """Short side -> `short_side`, long side capped at `max_size` (the original's rounding)."""
    h, w = record["image"].shape[:2]
    return resize_to(record, resized_size(h, w, short_side, max_size))


def hflip(record: Record) -> Record:
    """Mirror left-right: x -> W - x for boxes, masks flipped alike."""
    w = record["image"].shape[1]
    out = dict(record, image=record["image"][:, ::-1])
    b = record["boxes"]
    out["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
    if "masks" in record:
        out["masks"] = record["masks"][:, :, ::-1]
    return out


def crop(record: Record, top: int, left: int, height: int, width: int) -> Record:
    """Crop the region; boxes shifted and clipped, objects whose box becomes empty dropped.

    As in the original, `area` becomes the area of the clipped box.
    """
    out = dict(record, image=record["image"][top:top + height, left:left + width])
    boxes = record["boxes"] - np.array([left, top, left, top], np.float32)
    boxes = np.clip(boxes, 0, np.array([width, height, width, height], np.float32))
    out["boxes"] = boxes
    out["area"] = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).astype(np.float32)
    if "masks" in record:
        out["masks"] = record["masks"][:, top:top + height, left:left + width]
    return _select(out, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))


def random_resize(record: Record, rng: np.random.Generator, scales: Sequence[int],
                  max_size: Optional[int] = None) -> Record:
    """`resize` to a short side drawn uniformly from `scales`."""
    return resize(record, int(scales[rng.integers(len(scales))]), max_size)


def random_size_crop(record: Record, rng: np.random.Generator, min_size: int, max_size: int) -> Record:
    """Crop a random region, each side drawn uniformly in [min_size, min(side, max_size)].

    Where the image side is below `min_size` (the original would fail) the whole side is kept.
    """
    h, w = record["image"].shape[:2]
    cw_hi, ch_hi = min(w, max_size), min(h, max_size)
    cw = int(rng.integers(min(min_size, cw_hi), cw_hi + 1))
    ch = int(rng.integers(min(min_size, ch_hi), ch_hi + 1))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return crop(record, top, left, ch, cw)


def finalize(record: Record) -> Record:
    """Model inputs: image float32 [h, w, 3] normalized; boxes float32 [N, 4] normalized cx, cy, w, h."""
    h, w = record["image"].shape[:2]
    b = record["boxes"].astype(np.float32).reshape(-1, 4)
    cxcywh = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                       b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
    return dict(record, image=normalize(np.ascontiguousarray(record["image"])),
                boxes=(cxcywh / np.array([w, h, w, h], np.float32)).astype(np.float32),
                image_size=np.array([h, w], np.int32))


class TrainTransform:
    """The original training augmentation; `TrainTransform(cfg)(record, rng) -> model-input record`."""

    def __init__(self, config: DataConfig = DataConfig()):
        self.config = config

    def __call__(self, record: Record, rng: np.random.Generator) -> Record:
        c = self.config
        if rng.random() < c.hflip_prob:
            record = hflip(record)
        if rng.random() < c.crop_prob:
            record = random_resize(record, rng, c.crop_resize_scales)
            record = random_size_crop(record, rng, c.crop_min_size, c.crop_max_size)
        record = random_resize(record, rng, c.train_scales, c.train_max_size)
        return finalize(record)


class EvalTransform:
    """Resize to (short_side, max_size) and normalize; `rng` is ignored."""

    def __init__(self, config: DataConfig = DataConfig()):
        self.config = config

    def __call__(self, record: Record, rng: Optional[np.random.Generator] = None) -> Record:
        return finalize(resize(record, self.config.short_side, self.config.max_size))


def make_transform(config: DataConfig, train: bool):
    """TrainTransform or EvalTransform of `config`."""
    return TrainTransform(config) if train else EvalTransform(config)
