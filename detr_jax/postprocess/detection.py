"""The original's `PostProcess` (scored boxes) and `PostProcessSegm` (instance masks).

`class_scores`, `box_predictions` and `instance_masks` are jittable; `postprocess_boxes` and
`postprocess_instance_masks` return per-image numpy results at the original size.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.box_ops import box_cxcywh_to_xyxy
from detr_jax.postprocess.resample import resize_bilinear, resize_nearest

MASK_STRIDE = 4             # pred_masks is at stride 4 of the padded input
PANOPTIC_THRESHOLD = 0.85   # the original's PostProcessPanoptic default
MASK_THRESHOLD = 0.5        # PostProcessSegm: sigmoid(logit) > 0.5
MIN_SEGMENT_AREA = 4        # panoptic segments of at most this many pixels are dropped


# ----------------------------------------------------------------------------------------------
# Scores and boxes (jittable)

def class_scores(logits: jnp.ndarray, include_no_object: bool = False) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Softmax over all C+1 logits, then max / argmax: `[..., C+1]` -> scores, labels `[...]`.

    `include_no_object=False` (PostProcess) takes them over the C real classes; True (the panoptic
    post-processor) over all C+1, so a label of C means "no object".
    """
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if not include_no_object:
        prob = prob[..., :-1]
    return prob.max(-1), jnp.argmax(prob, axis=-1).astype(jnp.int32)


def box_predictions(logits: jnp.ndarray, boxes: jnp.ndarray, orig_sizes: jnp.ndarray) -> Dict[str, jnp.ndarray]:
    """The original `PostProcess`, batched: scores, labels [B, Q] and xyxy boxes [B, Q, 4] in pixels.

    Boxes (cx, cy, w, h) relative to the unpadded image are scaled by the original photo's
    (w, h, w, h), `orig_sizes` [B, 2] holding (h, w).
    """
    scores, labels = class_scores(logits)
    h, w = orig_sizes[:, 0], orig_sizes[:, 1]
    scale = jnp.stack([w, h, w, h], axis=-1).astype(jnp.float32)
    return {"scores": scores, "labels": labels, "boxes": box_cxcywh_to_xyxy(boxes) * scale[:, None, :]}


def postprocess_boxes(logits, boxes, orig_sizes) -> List[Dict[str, np.ndarray]]:
    """`box_predictions` as one dict of numpy arrays per image: scores [Q], labels [Q], boxes [Q, 4]."""
    out = jax.device_get(box_predictions(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(orig_sizes)))
    return [{k: np.asarray(v[i]) for k, v in out.items()} for i in range(len(out["scores"]))]


# ----------------------------------------------------------------------------------------------
# Mask resampling (jnp inside jit, or numpy on the host: the same float32 arithmetic)

def mask_grid_size(sizes):
    """Rows/columns of the stride-4 mask grid that an image of `sizes` (h, w) covers: ceil(x / 4)."""
    return (sizes + (MASK_STRIDE - 1)) // MASK_STRIDE


def _mask_regions(xp, masks_hw, image_sizes, crop: bool, target: str):
    """(src_sizes, dst_sizes) [B, 2] for resampling the mask grid, cropped or as the original."""
    image_sizes = xp.asarray(image_sizes)
    if crop:
        return mask_grid_size(image_sizes), image_sizes
    full = xp.broadcast_to(xp.asarray(masks_hw), image_sizes.shape)
    if target == "segm":  # PostProcessSegm: the whole grid to the batch's max processed size
        return full, xp.broadcast_to(image_sizes.max(0), image_sizes.shape)
    return full, image_sizes  # PostProcessPanoptic: the whole grid to each image's size


def instance_masks(pred_masks: jnp.ndarray, image_sizes: jnp.ndarray, out_hw: Tuple[int, int], *,
                   crop: bool = True, threshold: float = MASK_THRESHOLD) -> jnp.ndarray:
    """Binary masks at the processed size: bool [B, Q, Ho, Wo], valid in [:h, :w] of each image.

    `sigmoid(bilinear(logits)) > threshold`.  crop=True resamples each image's own grid region to
    its size (batch-independent); crop=False is the original (the whole padded grid to the batch's
    max processed size).  `out_hw` (static) must cover every image, e.g. 4 x the grid shape.
    """
    src, dst = _mask_regions(jnp, pred_masks.shape[-2:], image_sizes, crop, "segm")
    return resize_bilinear(jnp.asarray(pred_masks), src, dst, out_hw,
                           reduce=lambda logits: jax.nn.sigmoid(logits) > threshold)


_instance_masks_jit = jax.jit(instance_masks, static_argnames=("out_hw", "crop", "threshold"))


def postprocess_instance_masks(pred_masks, image_sizes, orig_sizes, *, crop: bool = True,
                               threshold: float = MASK_THRESHOLD) -> List[np.ndarray]:
    """The original `PostProcessSegm`: per image bool [Q, H0, W0] masks at the original size.

    Masks at the processed size (`instance_masks`, compiled once per mask-grid shape), cropped to
    each image's (h, w), then resized with the nearest rule to `orig_sizes`.
    """
    image_sizes, orig_sizes = np.asarray(image_sizes), np.asarray(orig_sizes)
    out_hw = tuple(MASK_STRIDE * int(n) for n in np.shape(pred_masks)[-2:])  # >= every image size
    masks = np.asarray(_instance_masks_jit(jnp.asarray(pred_masks), jnp.asarray(image_sizes),
                                           out_hw=out_hw, crop=crop, threshold=threshold))
    return [resize_nearest(m[:, :h, :w], (int(oh), int(ow)))
            for m, (h, w), (oh, ow) in zip(masks, image_sizes, orig_sizes)]
