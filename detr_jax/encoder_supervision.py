"""Dense one-to-many supervision of the encoder: a training-only convergence accelerator.

DETR's backbone and encoder learn only through the decoder's cross-attention, which is diffuse at
the start of training: the features learn slowly until the queries find the objects, and the
queries find the objects slowly until the features single them out.  Co-DETR (Zong et al. 2023,
"DETRs with Collaborative Hybrid Assignments Training") breaks this loop with auxiliary dense
heads on the encoder output, trained with one-to-many assignments and dropped at inference.  This
is the simplest such head:

* Assignment (`dense_assignment`): every encoder token (a cell of the stride-s feature grid) is
  assigned the target whose box contains the token's center, or whose center lies in the token's
  cell (so that objects smaller than a cell get a token too); of several, the smallest box.  A
  target has every token over it: one-to-many.
* Head (`EncoderHead`): the decoder's head shapes on each token of the encoder output, a linear
  classifier (num_classes + 1 logits, the last "no object") and a 3-layer MLP for the box, whose
  center is predicted relative to the token's center (`sigmoid(offset + logit(token center))`).
* Loss (`EncoderSupervision.criterion`): DETR's detection terms on the tokens
  (`losses.assigned_criterion`): cross-entropy with unassigned tokens as "no object" (weight
  `eos_coef`), L1 and GIoU over assigned tokens; tokens outside the image count for nothing.
  Their weighted total, times `TrainConfig.encoder_supervision`, is added to the loss.

The head's parameters live in `params["training_only"]["encoder_head"]` and are left out of the
exported model (`training_queries.model_params`): the trained model is plain DETR.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax import box_ops
from detr_jax.config import LossConfig, ModelConfig, TrainConfig
from detr_jax.losses import NO_LOSS, assigned_criterion, with_sample_valid
from detr_jax.matcher import ensure_target_slot
from detr_jax.models.detr import MLP
from detr_jax.models.layers import image_sizes_from_mask

log = logging.getLogger(__name__)
ENCODER_HEAD = "encoder_head"   # its subtree of params["training_only"]


def token_centers(image_sizes: jnp.ndarray, grid_hw: Tuple[int, int], padded_hw: Tuple[int, int]
                  ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The encoder tokens' geometry in each image's normalized coordinates.

    image_sizes int [B, 2] (h, w) of the unpadded images; grid_hw (h, w) of the feature grid of
    the padded batch `padded_hw` (H, W), whose stride is H / h.  Returns centers [B, T, 2] (x, y)
    with T = h w in row-major order, cells [B, 2] (width, height of a cell), and inside bool
    [B, T]: the token's center lies in the image."""
    h, w = grid_hw
    stride_y, stride_x = padded_hw[0] / h, padded_hw[1] / w
    sizes = image_sizes.astype(jnp.float32)
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) * stride_y, (jnp.arange(w) + 0.5) * stride_x, indexing="ij")
    x = xs.reshape(1, -1) / sizes[:, 1:2]
    y = ys.reshape(1, -1) / sizes[:, 0:1]
    cells = jnp.stack([stride_x / sizes[:, 1], stride_y / sizes[:, 0]], axis=-1)
    return jnp.stack([x, y], axis=-1), cells, (x < 1.0) & (y < 1.0)


def dense_assignment(centers: jnp.ndarray, cells: jnp.ndarray, inside: jnp.ndarray,
                     targets: Dict[str, jnp.ndarray]) -> jnp.ndarray:
    """The target slot of every token, int [B, T]: -1 for "no object", `losses.NO_LOSS` for
    tokens outside the image or of a row without `sample_valid`.

    A token takes a valid target whose box (cx, cy, w, h in [0, 1]) contains its center, or whose
    center lies in its cell ([B, 2] cell sizes); of several, the one of smallest area."""
    targets = with_sample_valid(ensure_target_slot(targets))
    boxes = targets["boxes"].astype(jnp.float32)[:, None]                         # [B, 1, M, 4]
    x, y = centers[..., 0][..., None], centers[..., 1][..., None]                 # [B, T, 1]
    x0, y0, x1, y1 = jnp.moveaxis(box_ops.box_cxcywh_to_xyxy(boxes), -1, 0)
    covers = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    half = cells[:, None, None, :] / 2
    holds_center = (jnp.abs(boxes[..., 0] - x) <= half[..., 0]) & (jnp.abs(boxes[..., 1] - y) <= half[..., 1])
    candidate = (covers | holds_center) & targets["valid"].astype(bool)[:, None, :]
    area = jnp.where(candidate, boxes[..., 2] * boxes[..., 3], jnp.inf)
    slot = jnp.where(candidate.any(-1), jnp.argmin(area, axis=-1), -1)
    counted = inside & targets["sample_valid"][:, None]
    return jnp.where(counted, slot, NO_LOSS).astype(jnp.int32)


class EncoderHead(nn.Module):
    """Class logits [B, T, num_logits] and boxes [B, T, 4] (cx, cy, w, h in [0, 1]) of every
    encoder token, from the encoder output [B, T, C] and the tokens' centers [B, T, 2]."""

    num_logits: int
    hidden_dim: int

    @nn.compact
    def __call__(self, memory: jnp.ndarray, centers: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
        memory = memory.astype(jnp.float32)
        logits = nn.Dense(self.num_logits, name="class_embed")(memory)
        offsets = MLP(self.hidden_dim, 4, 3, name="bbox_embed")(memory)
        center = jnp.clip(centers, 1e-3, 1 - 1e-3)
        reference = jnp.concatenate([jnp.log(center / (1 - center)), jnp.zeros_like(center)], axis=-1)
        return logits, nn.sigmoid(offsets + reference)


@dataclasses.dataclass(frozen=True)
class EncoderSupervision:
    """The head of a model config and the weight of its loss (`build`)."""

    model: ModelConfig
    weight: float

    @property
    def head(self) -> EncoderHead:
        return EncoderHead(self.model.num_logits, self.model.hidden_dim)

    def init_params(self, rng: jnp.ndarray) -> Dict[str, Any]:
        """Random head parameters: {ENCODER_HEAD: ...}, merged into params["training_only"]."""
        c = self.model.hidden_dim
        return {ENCODER_HEAD: self.head.init(rng, jnp.zeros((1, 1, c)), jnp.full((1, 1, 2), 0.5))["params"]}

    def abstract_params(self) -> Dict[str, Any]:
        """`init_params`' tree as `jax.ShapeDtypeStruct` leaves (nothing allocated)."""
        return jax.eval_shape(self.init_params, jax.random.PRNGKey(0))

    def criterion(self, training_params: Dict[str, Any], memory: jnp.ndarray, pixel_mask: jnp.ndarray,
                  targets: Dict[str, jnp.ndarray], loss_config: LossConfig,
                  axis_name: Optional[str] = None) -> Dict[str, jnp.ndarray]:
        """The encoder's terms: `loss_ce_enc`, `loss_bbox_enc`, `loss_giou_enc` and `loss_enc`, their
        weighted total (LossConfig's weights; `weight` is applied by the caller).

        memory [B, h, w, C]: the encoder output (`DETR`'s sown `intermediates/memory`);
        pixel_mask bool [B, H, W] of the batch; training_params: params["training_only"]."""
        b, h, w, c = memory.shape
        centers, cells, inside = token_centers(image_sizes_from_mask(pixel_mask), (h, w), pixel_mask.shape[1:3])
        assignment = dense_assignment(centers, cells, inside, targets)
        logits, boxes = self.head.apply({"params": training_params[ENCODER_HEAD]}, memory.reshape(b, h * w, c),
                                        centers)
        terms = assigned_criterion({"pred_logits": logits, "pred_boxes": boxes}, targets, assignment,
                                   dataclasses.replace(loss_config, aux_loss=False), axis_name=axis_name,
                                   eos_coef=loss_config.eos_coef)
        return {f"{name}_enc": terms[name] for name in ("loss_ce", "loss_bbox", "loss_giou", "loss")}


def build(train: TrainConfig, model: ModelConfig) -> Optional[EncoderSupervision]:
    """The encoder supervision of `train` (`encoder_supervision` > 0) for `model`, or None: off,
    or in the "masks" stage (which trains the mask head alone on a frozen detector)."""
    if train.encoder_supervision < 0:
        raise ValueError(f"encoder_supervision must be >= 0, got {train.encoder_supervision}")
    if train.encoder_supervision == 0:
        return None
    if train.stage == "masks":
        log.warning("encoder supervision trains the detector: off in the 'masks' stage")
        return None
    return EncoderSupervision(model, float(train.encoder_supervision))
