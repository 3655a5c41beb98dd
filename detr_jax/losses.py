"""DETR's set criterion (SetCriterion of the original) on padded, static-shape arrays.

`set_criterion(outputs, targets, config)` matches every decoder layer with the Hungarian matcher
and returns a dict of scalar terms, the same keys as the original returns:

* `loss_ce`: cross-entropy over all queries, unmatched ones labelled "no object" with weight
  `eos_coef`; a weighted MEAN (sum of w * nll / sum of w), as `F.cross_entropy` with weights.
* `loss_bbox`, `loss_giou`: L1 and 1 - GIoU over matched pairs, divided by `num_boxes`.
* `loss_mask`, `loss_dice` (when `config.masks`; final layer only): the matched queries' mask
  logits upsampled bilinearly (half-pixel, no antialiasing) to the padded target size, sigmoid
  focal loss (mean over pixels) and dice loss, summed over targets and divided by `num_boxes`.
* `class_error` (final layer only): 100 - accuracy (%) of the matched queries; 100 if no target.
* `cardinality_error`: mean over images of |#(argmax != no-object) - #targets|.
* `<name>_<i>` for each aux output i (labels, boxes, cardinality; no mask or class_error).
* `loss`: the weighted total; the weights (from `LossConfig`) are applied in `weighted_total` only.

`num_boxes = max(number of valid targets, 1)`.  A row with `targets["sample_valid"]` False (a
filler row of the loader, standing in for an unreadable sample) counts for nothing: none of its
targets is valid, its queries leave the cross-entropy, and the cardinality error is the mean
over the valid rows, so that the losses and gradients are those of the batch without that row.  Data parallel (`axis_name` given, inside
`pmap`/`shard_map`): normalizers (`num_boxes`, the CE weight sum) and the metrics use the
totals over the axis; each loss term is this device's share scaled by the number of devices, so
that its `pmean` over the axis, and the `pmean` of its gradients, equal those of the global
batch on one device (the original divides the all-reduced num_boxes by the world size likewise).
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

from detr_jax import box_ops
from detr_jax.config import LossConfig
from detr_jax.matcher import ensure_target_slot, hungarian_match, safe_target_boxes

Array = jnp.ndarray
NO_LOSS = -2    # an assignment (`assigned_criterion`) that gives a query no loss term at all

# weighted terms -> the LossConfig field holding their weight (aux copies `<name>_<i>` share it)
WEIGHT_FIELDS = {"loss_ce": "ce_weight", "loss_bbox": "bbox_weight", "loss_giou": "giou_weight",
                 "loss_mask": "mask_weight", "loss_dice": "dice_weight"}


def weighted_total(losses: Dict[str, Array], config: LossConfig) -> Array:
    """Sum of `weight * term` over the weighted terms in `losses` (metrics are not weighted)."""
    total = jnp.zeros((), jnp.float32)
    for name, value in losses.items():
        field = WEIGHT_FIELDS.get(re.sub(r"_\d+$", "", name))
        if field is not None:
            total = total + getattr(config, field) * value
    return total


def _gather_queries(values: Array, match: Array) -> Array:
    """`[B, M, ...]` per-target values gathered for each query by `match` `[B, Q]` (clipped)."""
    index = jnp.clip(match, 0, values.shape[1] - 1)
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def _detection_sums(logits: Array, boxes: Array, match: Array, targets: Dict[str, Array],
                    eos_coef: float) -> Dict[str, Array]:
    """Unnormalized sums of one decoder layer: logits `[B, Q, C+1]`, boxes `[B, Q, 4]`,
    match `[B, Q]` (a target slot, -1 "no object", `NO_LOSS`), over the rows with
    `targets["sample_valid"]` `[B]`.  Returns scalars: ce_num, ce_den, l1, giou, correct, matched,
    card_abs."""
    no_object = logits.shape[-1] - 1
    matched = match >= 0
    target_class = jnp.where(matched, _gather_queries(targets["labels"], match), no_object)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, target_class[..., None], axis=-1)[..., 0]
    weight = jnp.where(target_class == no_object, eos_coef, 1.0).astype(jnp.float32)
    weight = jnp.where(targets["sample_valid"][:, None] & (match != NO_LOSS), weight, 0.0)

    predicted = jnp.argmax(logits, axis=-1)
    num_objects = jnp.sum(predicted != no_object, axis=-1)
    num_targets = jnp.sum(targets["valid"], axis=-1)

    # matched pairs only; unmatched queries see a harmless box pair (no NaN, zero gradient)
    tgt_boxes = safe_target_boxes(targets["boxes"].astype(jnp.float32), targets["valid"])
    tgt_boxes = _gather_queries(tgt_boxes, match)
    src_boxes = jnp.where(matched[..., None], boxes.astype(jnp.float32), tgt_boxes)
    l1 = jnp.abs(src_boxes - tgt_boxes).sum(-1)
    giou = box_ops.generalized_box_iou_elementwise(box_ops.box_cxcywh_to_xyxy(src_boxes),
                                                   box_ops.box_cxcywh_to_xyxy(tgt_boxes))
    return {
        "ce_num": jnp.sum(weight * nll),
        "ce_den": jnp.sum(weight),
        "l1": jnp.sum(jnp.where(matched, l1, 0.0)),
        "giou": jnp.sum(jnp.where(matched, 1.0 - giou, 0.0)),
        "correct": jnp.sum(matched & (predicted == target_class)).astype(jnp.float32),
        "matched": jnp.sum(matched).astype(jnp.float32),
        "card_abs": jnp.sum(jnp.where(targets["sample_valid"], jnp.abs(num_objects - num_targets), 0)
                            ).astype(jnp.float32),
    }


def sigmoid_focal_loss(logits: Array, targets: Array, alpha: float = 0.25,
                       gamma: float = 2.0) -> Array:
    """Per-element focal loss of mask logits vs binary targets (same shapes); alpha < 0: none."""
    prob = jax.nn.sigmoid(logits)
    ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: Array, targets: Array) -> Array:
    """Dice loss per mask: `[..., H, W]` logits and binary targets -> `[...]`."""
    prob = jax.nn.sigmoid(logits)
    numerator = 2 * jnp.sum(prob * targets, axis=(-2, -1))
    denominator = jnp.sum(prob, axis=(-2, -1)) + jnp.sum(targets, axis=(-2, -1))
    return 1 - (numerator + 1) / (denominator + 1)


def upsample_masks(masks: Array, size) -> Array:
    """Bilinear resize of `[..., h, w]` to `[..., H, W]` as torch `F.interpolate(mode="bilinear",
    align_corners=False)` (half-pixel centers, edge clamped, no antialiasing)."""
    shape = masks.shape[:-2] + tuple(size)
    return jax.image.resize(masks, shape, method="bilinear", antialias=False)


MASK_LOSS_CHUNK = 10   # target slots whose upsampled masks are live at once in the mask losses


def _chunk_size(total: int, limit: int) -> int:
    """The largest divisor of `total` that is at most `limit` (at least 1)."""
    return max(d for d in range(1, max(min(total, limit), 1) + 1) if total % d == 0)


def _mask_sums(pred_masks: Optional[Array], match: Array, targets: Dict[str, Array],
               config: LossConfig, chunk: int = MASK_LOSS_CHUNK,
               mask_fn: Optional[Callable[[Array], Array]] = None) -> Dict[str, Array]:
    """Sums over matched targets of the focal (pixel mean) and dice losses.

    Per target slot: pred_masks `[B, Q, h, w]` of the matched query (or `mask_fn(query)`, the
    masks of the query matched to each slot, `[B, M]` -> `[B, M, h, w]`) -> `[B, M, Hm, Wm]`.  The
    upsampled masks are never all live: the per-slot losses are computed `chunk` slots at a
    time (`lax.map` over chunks, each under `jax.checkpoint`, so the backward pass recomputes one
    chunk at a time as well); every slot's value is the same as computed all at once.
    """
    num_slots = targets["valid"].shape[-1]
    hit = match[:, :, None] == jnp.arange(num_slots)                     # [B, Q, M]
    used = jnp.any(hit, axis=1) & targets["valid"]                       # [B, M]
    query = jnp.argmax(hit, axis=1)                                      # [B, M]
    if mask_fn is not None:
        src = mask_fn(query).astype(jnp.float32)
    else:
        src = jnp.take_along_axis(pred_masks.astype(jnp.float32), query[:, :, None, None], axis=1)
    tgt = targets["masks"]
    size = _chunk_size(num_slots, chunk)
    n = num_slots // size

    def chunks(x):                                                       # [B, M, ...] -> [n, B, size, ...]
        return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def per_slot(args):
        src, tgt = args                                                  # [B, size, h, w], [B, size, Hm, Wm]
        tgt = tgt.astype(jnp.float32)
        src = upsample_masks(src, tgt.shape[-2:])
        focal = jnp.mean(sigmoid_focal_loss(src, tgt, config.focal_alpha, config.focal_gamma),
                         axis=(-2, -1))
        return focal, dice_loss(src, tgt)                                # [B, size] each

    focal, dice = jax.lax.map(per_slot, (chunks(src), chunks(tgt)))       # [n, B, size] each
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(used.shape)  # noqa: E731
    return {"mask": jnp.sum(jnp.where(used, unchunk(focal), 0.0)),
            "dice": jnp.sum(jnp.where(used, unchunk(dice), 0.0))}


def with_sample_valid(targets: Dict[str, Array]) -> Dict[str, Array]:
    """Targets whose rows with `sample_valid` False `[B]` (the loader's filler rows) have no valid
    target; `sample_valid` all True when absent.  Those rows then match nothing and take no part
    in any term: their cross-entropy weight and cardinality are masked in `_detection_sums`."""
    valid = targets["valid"]
    sample_valid = targets.get("sample_valid")
    sample_valid = jnp.ones(valid.shape[:1], bool) if sample_valid is None else jnp.asarray(sample_valid, bool)
    return dict(targets, valid=valid & sample_valid[:, None], sample_valid=sample_valid)


def set_criterion(outputs: Dict, targets: Dict[str, Array], config: LossConfig = LossConfig(),
                  axis_name: Optional[str] = None,
                  mask_fn: Optional[Callable[[Array], Array]] = None) -> Dict[str, Array]:
    """DETR's losses for model `outputs` and padded `targets` (see the module docstring).

    Jittable and differentiable w.r.t. the outputs; the matching is constant (no gradient).
    With the mask losses, `mask_fn` (optional) computes the mask logits `[B, M, h, w]` of given
    queries `[B, M]` (the query matched to each target slot; any query for an unused slot), in
    place of `outputs["pred_masks"]`: the same losses from masks of the matched queries only.
    """
    targets = with_sample_valid(ensure_target_slot(targets))
    layers = [outputs]
    if config.aux_loss:
        layers = list(outputs.get("aux_outputs", ())) + layers       # aux 0..L-2, then final
    logits = jnp.stack([layer["pred_logits"] for layer in layers])    # [L, B, Q, C+1]
    boxes = jnp.stack([layer["pred_boxes"] for layer in layers])      # [L, B, Q, 4]
    matcher = functools.partial(hungarian_match, cost_class=config.cost_class,
                                cost_bbox=config.cost_bbox, cost_giou=config.cost_giou,
                                method=config.matcher)
    match = jax.vmap(matcher, in_axes=(0, None))({"pred_logits": logits, "pred_boxes": boxes},
                                                 targets)           # one host call for all layers
    match = jax.lax.stop_gradient(match)                              # [L, B, Q]
    sums = jax.vmap(_detection_sums, in_axes=(0, 0, 0, None, None))(
        logits, boxes, match, targets, config.eos_coef)

    def total(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    num_devices = total(1)
    num_boxes = jnp.maximum(total(jnp.sum(targets["valid"]).astype(jnp.float32)), 1.0) / num_devices
    ce_den = total(sums["ce_den"]) / num_devices
    # a batch of filler rows only (every image unreadable) weighs nothing: loss 0, not 0 / 0
    ce = sums["ce_num"] / jnp.where(ce_den > 0, ce_den, 1.0)
    correct, matched = total(sums["correct"]), total(sums["matched"])
    class_error = jnp.where(matched > 0, 100 - 100 * correct / jnp.maximum(matched, 1.0), 100.0)
    num_samples = jnp.maximum(total(jnp.sum(targets["sample_valid"]).astype(jnp.float32)), 1.0)
    cardinality = total(sums["card_abs"]) / num_samples
    terms = {"loss_ce": ce, "loss_bbox": sums["l1"] / num_boxes,
             "loss_giou": sums["giou"] / num_boxes, "cardinality_error": cardinality}

    final = len(layers) - 1
    losses = {name: value[final] for name, value in terms.items()}
    losses["class_error"] = class_error[final]
    if config.masks:
        mask = _mask_sums(outputs.get("pred_masks"), match[final], targets, config, mask_fn=mask_fn)
        losses["loss_mask"] = mask["mask"] / num_boxes
        losses["loss_dice"] = mask["dice"] / num_boxes
    for i in range(final):
        losses.update({f"{name}_{i}": value[i] for name, value in terms.items()})
    losses["loss"] = weighted_total(losses, config)
    return losses


def assigned_criterion(outputs: Dict, targets: Dict[str, Array], assignment: Array, config: LossConfig = LossConfig(),
                       axis_name: Optional[str] = None, eos_coef: float = 0.0) -> Dict[str, Array]:
    """The detection losses of queries whose targets are given, not matched (query denoising, the
    encoder supervision).

    `assignment` int `[B, Q]`: the target slot of each query, -1 for "no object", or `NO_LOSS`.
    Returns `loss_ce` (the weighted mean over the queries of -log p(target class), weight 1 for an
    assigned query and `eos_coef` for a "no object" one: the default 0 gives those no term),
    `loss_bbox` and `loss_giou` (sums over assigned queries divided by their
    number), the same per aux output (`<name>_<i>` when `config.aux_loss`), and `loss`, their
    weighted total (`weighted_total`).  Rows whose `sample_valid` (when present) is False
    contribute nothing.  `axis_name`: normalizers over the data-parallel axis, as `set_criterion`.
    """
    targets = with_sample_valid(ensure_target_slot(targets))
    assignment = jnp.where(targets["sample_valid"][:, None], assignment, -1)
    layers = [outputs]
    if config.aux_loss:
        layers = list(outputs.get("aux_outputs", ())) + layers
    logits = jnp.stack([layer["pred_logits"] for layer in layers])    # [L, B, Q, C+1]
    boxes = jnp.stack([layer["pred_boxes"] for layer in layers])      # [L, B, Q, 4]
    sums = jax.vmap(_detection_sums, in_axes=(0, 0, None, None, None))(logits, boxes, assignment, targets, eos_coef)

    def total(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    num_devices = total(1)
    num_assigned = jnp.maximum(total(jnp.sum(assignment >= 0).astype(jnp.float32)), 1.0) / num_devices
    terms = {"loss_ce": sums["ce_num"] / (jnp.maximum(total(sums["ce_den"]), 1.0) / num_devices),
             "loss_bbox": sums["l1"] / num_assigned, "loss_giou": sums["giou"] / num_assigned}
    final = len(layers) - 1
    losses = {name: value[final] for name, value in terms.items()}
    for i in range(final):
        losses.update({f"{name}_{i}": value[i] for name, value in terms.items()})
    losses["loss"] = weighted_total(losses, config)
    return losses
