"""Box conversions and (generalized) IoU as pure `jnp` functions.

Boxes are `[..., 4]` arrays, either (cx, cy, w, h) or (x0, y0, x1, y1) with x0 <= x1, y0 <= y1.
Pairwise functions take `[..., N, 4]` and `[..., M, 4]` and return `[..., N, M]`; the
`*_elementwise` variants take two arrays of the same shape `[..., 4]` and return `[...]`
(the diagonal of the pairwise result, which is what the box losses need).

As in the original, nothing guards against degenerate boxes: a box pair whose union (or
enclosing box) has zero area gives NaN.  Callers that hold padding should replace padded boxes
by a harmless box before calling (see `losses.py`).
"""
from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
    """(cx, cy, w, h) -> (x0, y0, x1, y1), `[..., 4]`."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
    """(x0, y0, x1, y1) -> (cx, cy, w, h), `[..., 4]`."""
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    """Area of (x0, y0, x1, y1) boxes: `[..., 4]` -> `[...]`."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_union(a: jnp.ndarray, b: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """IoU and union area of broadcastable xyxy boxes `a`, `b` (`[..., 4]`)."""
    lt = jnp.maximum(a[..., :2], b[..., :2])
    rb = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.clip(rb - lt, min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter / union, union


def _giou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Generalized IoU of broadcastable xyxy boxes: IoU - (enclosing - union) / enclosing."""
    iou, union = _iou_union(a, b)
    lt = jnp.minimum(a[..., :2], b[..., :2])
    rb = jnp.maximum(a[..., 2:], b[..., 2:])
    wh = jnp.clip(rb - lt, min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Pairwise IoU and union of xyxy boxes: `[..., N, 4]`, `[..., M, 4]` -> two `[..., N, M]`."""
    return _iou_union(boxes1[..., :, None, :], boxes2[..., None, :, :])


def generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Pairwise generalized IoU (in [-1, 1]) of xyxy boxes: `[..., N, 4]`, `[..., M, 4]` ->
    `[..., N, M]`."""
    return _giou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def box_iou_elementwise(boxes1: jnp.ndarray,
                        boxes2: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """IoU and union of corresponding xyxy boxes: two `[..., 4]` -> two `[...]`."""
    return _iou_union(boxes1, boxes2)


def generalized_box_iou_elementwise(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
    """Generalized IoU of corresponding xyxy boxes: two `[..., 4]` -> `[...]`."""
    return _giou(boxes1, boxes2)
