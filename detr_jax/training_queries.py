"""Training-only convergence accelerators: query denoising and parallel query groups.

Both add queries to the decoder during training only; the trained model is plain DETR (the same
modules, parameters and post-processing), and inference decodes its own Q object queries alone.

* Query denoising (DN-DETR): each image's ground truth, noised (`DenoisingConfig`: boxes moved
  and scaled, some labels replaced by random classes), is decoded as `groups` extra groups of M
  queries (one per target slot), each of which learns to reconstruct the target it was built
  from: the losses of `losses.assigned_criterion`, no matching.  DETR's decoder starts from
  zeros and adds a learned position (`query_pos`) to its queries and keys; a denoising query's
  content is the embedding of its noised label and its position an MLP of the sine embedding of
  its noised box (DN-DETR's split of label into the content and box into the positional query).
  DETR's values carry no positions, so the box enters only through where the query attends: to
  reconstruct the box the decoder must find the object near the hint, as a matching query must.
* Parallel query groups (Group DETR): K - 1 extra groups of Q learned positions, each matched
  one-to-one to the targets on its own; with Q queries per group, an object gets K predictions
  with a loss (one-to-many assignment) while each group keeps DETR's duplicate-free training.

Queries are decoded as one sequence: the model's Q, the other groups' (K - 1) Q, then the
denoising groups' G M.  The decoder self-attention mask (`self_attention_mask`) keeps every query
group to itself; a denoising query also sees the model's Q queries (they carry no ground truth),
never the reverse; padded target slots are hidden from every other query.  So the first Q outputs
are exactly what the model computes alone, and the loss adds one term per group.

Parameters live in `params["training_only"]` beside the model's (`TRAINING_ONLY`), trained with
the model's learning rate, and are left out of every exported model (`model_params`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.config import DenoisingConfig, LossConfig, ModelConfig, TrainConfig
from detr_jax.losses import assigned_criterion, set_criterion
from detr_jax.matcher import ensure_target_slot
from detr_jax.models.detr import MLP, ExtraQueries

log = logging.getLogger(__name__)
TRAINING_ONLY = "training_only"     # the params subtree of the training-only parameters
BOX_TEMPERATURE = 10000.0           # the sine embedding's, as the image positions'


def model_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """The model's parameters: `params` without the training-only subtree (what is exported)."""
    return {k: v for k, v in params.items() if k != TRAINING_ONLY}


def noised_targets(labels: jnp.ndarray, boxes: jnp.ndarray, groups: int, config: DenoisingConfig,
                   num_classes: int, rng: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """`groups` noised copies of the targets: labels int [B, M] and boxes [B, M, 4] (cx, cy, w, h)
    -> labels [B, G, M] and boxes [B, G, M, 4], in [0, 1].

    Each center moves by up to `box_noise` times half the box's side and each side is scaled by a
    factor in [1 - box_noise, 1 + box_noise] (uniform draws); each label is replaced by a uniformly
    drawn class with probability `label_noise`.  Zero noise gives exact copies.
    """
    b, m = labels.shape
    shape = (b, groups, m)
    k_shift, k_scale, k_flip, k_class = jax.random.split(rng, 4)
    boxes = jnp.broadcast_to(boxes[:, None].astype(jnp.float32), shape + (4,))
    center, size = boxes[..., :2], boxes[..., 2:]
    shift = jax.random.uniform(k_shift, shape + (2,), minval=-1.0, maxval=1.0) * config.box_noise * size / 2
    scale = 1.0 + jax.random.uniform(k_scale, shape + (2,), minval=-1.0, maxval=1.0) * config.box_noise
    noised_boxes = jnp.clip(jnp.concatenate([center + shift, size * scale], axis=-1), 0.0, 1.0)
    flip = jax.random.bernoulli(k_flip, config.label_noise, shape)
    noised_labels = jnp.where(flip, jax.random.randint(k_class, shape, 0, num_classes),
                              jnp.broadcast_to(labels[:, None], shape))
    return noised_labels.astype(jnp.int32), noised_boxes


def box_sine_embedding(boxes: jnp.ndarray, dim: int) -> jnp.ndarray:
    """[..., 4] boxes in [0, 1] -> [..., 4 * dim]: each coordinate scaled by 2 pi, then sin / cos at
    dim / 2 frequencies (interleaved), as the image's sine positions."""
    freqs = BOX_TEMPERATURE ** (2 * (jnp.arange(dim // 2, dtype=jnp.float32)) / dim)
    angles = boxes[..., None] * (2 * math.pi) / freqs                          # [..., 4, dim / 2]
    emb = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)               # [..., 4, dim / 2, 2]
    return emb.reshape(*boxes.shape[:-1], 4 * dim)


def self_attention_mask(num_queries: int, query_groups: int, denoising_valid: jnp.ndarray) -> jnp.ndarray:
    """The decoder self-attention mask of the training queries: bool [B, T, T], T = K Q + G M.

    `denoising_valid` bool [B, G, M] (G may be 0): which denoising queries come from a real target.
    Query i attends to query j when both are in the same group (a query group of Q, or a
    denoising group of M), or when i is a denoising query and j one of the model's own Q; padded
    denoising slots are hidden from every query but themselves.
    """
    b, groups, m = denoising_valid.shape
    group = jnp.concatenate([jnp.repeat(jnp.arange(query_groups), num_queries),
                             query_groups + jnp.repeat(jnp.arange(groups), m)])              # [T]
    denoising = group >= query_groups
    allowed = (group[:, None] == group[None, :]) | (denoising[:, None] & (group[None, :] == 0))
    key_valid = jnp.concatenate([jnp.ones((b, query_groups * num_queries), bool),
                                 denoising_valid.reshape(b, groups * m)], axis=1)            # [B, T]
    return (allowed[None] & key_valid[:, None, :]) | jnp.eye(group.shape[0], dtype=bool)[None]


class TrainingQueries(nn.Module):
    """The training-only queries: their parameters (`params["training_only"]`) and construction.

    `__call__(targets, rng)` -> (`ExtraQueries` for `DETR.detect_with_extra_queries`, the
    denoising assignment int [B, G M]: the target slot of each denoising query, -1 for padding).
    Parameters: `group_query_embed` [(K - 1) Q, C] (the other groups' positions, N(0, 1) as the
    model's `query_embed`), and with denoising `label_embed` [num_classes, C] and `box_embed`
    (a 2-layer MLP of the boxes' sine embedding).
    """

    model: ModelConfig
    query_groups: int = 1
    denoising: DenoisingConfig = DenoisingConfig()

    @nn.compact
    def __call__(self, targets: Dict[str, jnp.ndarray], rng: jnp.ndarray) -> Tuple[ExtraQueries, jnp.ndarray]:
        targets = ensure_target_slot(targets)
        q, c, k, g = self.model.num_queries, self.model.hidden_dim, self.query_groups, self.denoising.groups
        b, m = targets["labels"].shape
        content, pos = [], []
        if k > 1:
            embed = self.param("group_query_embed", nn.initializers.normal(1.0), ((k - 1) * q, c))
            pos.append(jnp.broadcast_to(embed, (b, (k - 1) * q, c)))
            content.append(jnp.zeros((b, (k - 1) * q, c)))
        valid = jnp.broadcast_to(targets["valid"].astype(bool)[:, None], (b, g, m))
        if g > 0:
            labels, boxes = noised_targets(targets["labels"], targets["boxes"], g, self.denoising,
                                           self.model.num_classes, rng)
            label_embed = nn.Embed(self.model.num_classes, c, embedding_init=nn.initializers.normal(1.0),
                                   name="label_embed")
            content.append(label_embed(labels.reshape(b, g * m)))
            pos.append(MLP(c, c, 2, name="box_embed")(box_sine_embedding(boxes.reshape(b, g * m, 4), c // 2)))
        extra = ExtraQueries(content=jnp.concatenate(content, axis=1), pos=jnp.concatenate(pos, axis=1),
                             self_attention_mask=self_attention_mask(q, k, valid))
        assignment = jnp.where(valid, jnp.arange(m), -1).reshape(b, g * m).astype(jnp.int32)
        return extra, assignment

    def init_params(self, rng: jnp.ndarray) -> Dict[str, Any]:
        """Random training-only parameters (they do not depend on the number of target slots)."""
        return self.init(rng, _dummy_targets(), jax.random.PRNGKey(0))["params"]

    def abstract_params(self) -> Dict[str, Any]:
        """`init_params`' tree as `jax.ShapeDtypeStruct` leaves (nothing allocated)."""
        return jax.eval_shape(self.init_params, jax.random.PRNGKey(0))


def _dummy_targets() -> Dict[str, jnp.ndarray]:
    return {"labels": jnp.zeros((1, 1), jnp.int32), "boxes": jnp.full((1, 1, 4), 0.5), "valid": jnp.ones((1, 1), bool)}


def build(train: TrainConfig, model: ModelConfig) -> Optional[TrainingQueries]:
    """The training queries of `train`'s accelerators for `model`, or None when both are off (the
    train step is then exactly DETR's) or in the "masks" stage (which trains the mask head alone,
    on a frozen detector: the accelerators' losses would not reach it)."""
    if train.query_groups < 1 or train.denoising.groups < 0:
        raise ValueError(f"query_groups must be >= 1 and denoising.groups >= 0, got {train.query_groups} and "
                         f"{train.denoising.groups}")
    if train.query_groups == 1 and train.denoising.groups == 0:
        return None
    if train.stage == "masks":
        log.warning("query groups and denoising train the detector: off in the 'masks' stage")
        return None
    return TrainingQueries(model, train.query_groups, train.denoising)


def split_outputs(outputs: Dict[str, Any], num_queries: int, query_groups: int
                  ) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """Outputs over T = K Q + G M queries (`detect_with_extra_queries`) -> (the model's own Q
    queries' [B, Q, ...], the other groups' stacked on the batch axis [(K - 1) B, Q, ...] (group
    major), the denoising queries' [B, G M, ...]), each with its `aux_outputs`."""
    q, k = num_queries, query_groups

    def split(layer):
        own = {name: layer[name][:, :q] for name in ("pred_logits", "pred_boxes")}
        groups = {name: _groups_on_batch(layer[name][:, q:k * q], k - 1) for name in ("pred_logits", "pred_boxes")}
        denoising = {name: layer[name][:, k * q:] for name in ("pred_logits", "pred_boxes")}
        return own, groups, denoising

    parts = split(outputs)
    if "aux_outputs" in outputs:
        aux = [split(layer) for layer in outputs["aux_outputs"]]
        for i, part in enumerate(parts):
            part["aux_outputs"] = [layer[i] for layer in aux]
    return parts


def _groups_on_batch(x: jnp.ndarray, groups: int) -> jnp.ndarray:
    """[B, groups * Q, ...] -> [groups * B, Q, ...], group major."""
    b = x.shape[0]
    x = x.reshape(b, groups, x.shape[1] // max(groups, 1), *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(groups * b, *x.shape[2:])


def training_criterion(outputs: Dict[str, Any], targets: Dict[str, jnp.ndarray], assignment: jnp.ndarray,
                       queries: TrainingQueries, loss_config: LossConfig, axis_name: Optional[str] = None,
                       mask_fn=None) -> Dict[str, jnp.ndarray]:
    """The losses of `outputs` over the training queries of `queries` (`split_outputs`' layout),
    `assignment` the denoising queries' target slots [B, G M] (`TrainingQueries.__call__`).

    The model's own Q queries: `set_criterion` as without the accelerators (the same terms, the
    mask losses included).  The other K - 1 groups: each matched on its own (`set_criterion` on the
    groups stacked on the batch axis, detection losses only); their mean total is `loss_groups`,
    added K - 1 times (Group DETR sums the groups' losses).  The denoising queries:
    `assigned_criterion` against the targets they were built from, its terms suffixed `_dn`
    (`loss_dn` their total, added once).  `loss`: the sum.
    """
    query_groups = queries.query_groups
    own, groups, denoising = split_outputs(outputs, queries.model.num_queries, query_groups)
    terms = dict(set_criterion(own, targets, loss_config, axis_name=axis_name, mask_fn=mask_fn))
    loss = terms["loss"]
    if query_groups > 1:
        tiled = {k: jnp.concatenate([v] * (query_groups - 1)) for k, v in targets.items() if k != "masks"}
        group_terms = set_criterion(groups, tiled, dataclasses.replace(loss_config, masks=False), axis_name=axis_name)
        terms["loss_groups"] = group_terms["loss"]
        loss = loss + (query_groups - 1) * group_terms["loss"]
    if queries.denoising.groups > 0:
        dn = assigned_criterion(denoising, targets, assignment, loss_config, axis_name=axis_name)
        terms.update({f"{name}_dn": dn[name] for name in ("loss_ce", "loss_bbox", "loss_giou")})
        terms["loss_dn"] = dn["loss"]
        loss = loss + dn["loss"]
    terms["loss"] = loss
    return terms
