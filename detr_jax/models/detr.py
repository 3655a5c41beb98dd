"""DETR: backbone + transformer + set-prediction heads, and the panoptic variant (DETRsegm).

Inputs: `pixel_values` float32 [B, H, W, 3], normalized with the ImageNet mean/std, zero-padded
at the bottom/right; `pixel_mask` bool [B, H, W], True on real pixels and False on padding
(the original DETR passes the opposite polarity, True on padding).

Outputs (dict):
  pred_logits  [B, Q, num_classes + 1]  the last logit is "no object"
  pred_boxes   [B, Q, 4]                (cx, cy, w, h) in [0, 1] of each unpadded image
  pred_masks   [B, Q, H/4, W/4]          mask logits on the padded stride-4 grid (panoptic only)
  aux_outputs  list of dec_layers - 1 dicts with pred_logits / pred_boxes of earlier layers

Masks of selected queries only (`mask_queries=K`, inference): the post-processors use only queries
whose best real-class probability passes a threshold, so the mask head (most of the panoptic
model's FLOPs) can run on the K best queries alone.  `pred_masks` keeps its [B, Q, ...] layout with
`MASK_FILL` for the others, and `mask_score_cutoff` [B] gives the best score left out: when it
passes the caller's threshold, run again with all queries (exact either way).  Exact in one go:
`mask_queries=0` runs only the per-image part of the mask head and returns what its per-query part
needs as `mask_inputs` (a dict of arrays); `mask_logits(config, params, mask_inputs, indices)` then
runs that part on any chosen queries (`DETRModel`'s `mask_threshold`: the queries over a threshold,
their count rounded up to a multiple of 8; one compile per count).

Padding: with `padding_invariant=True` (the default) every image in a padded batch gives what it
gives alone, unpadded: activations outside each image's valid region are zeroed after every
backbone and mask-head layer, GroupNorm statistics skip the padding, and feature masks come from
the exact stride arithmetic.  `padding_invariant=False` reproduces the original, where padding
changes the results (feature masks by nearest interpolation of the pixel mask).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.config import CONVNET_WIDTHS, ModelConfig
from detr_jax.models.backbone import ConvNet, ResNet
from detr_jax.models.layers import Conv1x1, image_sizes_from_mask, nearest_resize, valid_mask
from detr_jax.models.position import sine_position_embedding
from detr_jax.models.segmentation import MaskHeadSmallConv, MHAttentionMap
from detr_jax.models.transformer import Transformer


MASK_FILL = -1e4   # mask logit of queries skipped by `mask_queries` (sigmoid = 0)


def select_mask_queries(logits: jnp.ndarray, k: int):
    """Indices [B, k] of the queries with the best real-class probability (k < Q), and the best
    score left out [B] (a query passes a threshold t only if it is selected or cutoff > t)."""
    scores = jax.nn.softmax(logits, axis=-1)[..., :-1].max(axis=-1)
    top, indices = jax.lax.top_k(scores, k + 1)
    return indices[:, :k], top[:, k]


def fill_skipped_masks(masks: jnp.ndarray, indices: jnp.ndarray, num_queries: int) -> jnp.ndarray:
    """Masks [B, K, h, w] of the queries `indices` [B, K] -> [B, num_queries, h, w], `MASK_FILL`
    for the queries not in `indices`."""
    b = masks.shape[0]
    full = jnp.full((b, num_queries, *masks.shape[2:]), MASK_FILL, jnp.float32)
    return full.at[jnp.arange(b)[:, None], indices].set(masks)


def mask_modules(cfg: ModelConfig, named: bool = False):
    """(bbox_attention, mask_head) modules of the panoptic model, named as in DETR's tree when `named`."""
    dt = jnp.dtype(cfg.dtype)
    names = ("bbox_attention", "mask_head") if named else (None, None)
    return (MHAttentionMap(cfg.hidden_dim, cfg.num_heads, dt, name=names[0]),
            MaskHeadSmallConv(cfg.hidden_dim, cfg.num_heads, dt, name=names[1]))


def mask_logits(config: ModelConfig, params: Dict[str, Any], mask_inputs: Dict[str, Any],
                query_indices: jnp.ndarray) -> jnp.ndarray:
    """Mask logits float32 [B, K, H/4, W/4] of the queries `query_indices` int [B, K], from the
    `mask_inputs` of a `mask_queries=0` run (which did the per-image part of the mask head) and
    the model's `params`: the same values as the full model gives for those queries."""
    attention_module, head = mask_modules(config)
    queries = jnp.take_along_axis(mask_inputs["queries"], query_indices[..., None], axis=1)
    attention = attention_module.apply({"params": params["bbox_attention"]}, queries, mask_inputs["memory"],
                                       mask_inputs["valid"])
    masks = head.apply({"params": params["mask_head"]}, mask_inputs["shared"], mask_inputs["adapters"], attention,
                       mask_inputs["sizes"], method=MaskHeadSmallConv.query_masks)
    return masks.astype(jnp.float32)


class MLP(nn.Module):
    """`num_layers` Dense layers with ReLU between them (`layers_0` .. `layers_{n-1}`)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype, name=f"layers_{i}")(x)
            x = x if last else nn.relu(x)
        return x


def feature_masks(pixel_mask: jnp.ndarray, hw) -> jnp.ndarray:
    """The original's feature mask: nearest interpolation of the pixel mask to `hw`."""
    return nearest_resize(pixel_mask, hw, axes=(1, 2))


class DETR(nn.Module):
    """DETR, with the panoptic mask head when `config.masks`.  See the module docstring."""

    config: ModelConfig

    @nn.compact
    def __call__(self, pixel_values: jnp.ndarray, pixel_mask: jnp.ndarray, *, train: bool = False,
                 padding_invariant: bool = True, mask_queries: Optional[int] = None) -> Dict[str, Any]:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        sizes = image_sizes_from_mask(pixel_mask) if padding_invariant else None
        backbone = ConvNet(CONVNET_WIDTHS[cfg.backbone], dt, name="backbone") if cfg.is_convnet else \
            ResNet(cfg.resnet_depths, cfg.resnet_width, cfg.dilation, dt, name="backbone")
        features, feature_sizes = backbone(pixel_values, sizes)
        layer4 = features[-1]
        hw = layer4.shape[1:3]
        valid = valid_mask(feature_sizes[-1], hw) if padding_invariant else feature_masks(pixel_mask, hw)
        pos = sine_position_embedding(valid, cfg.hidden_dim // 2).astype(dt)
        src = Conv1x1(cfg.hidden_dim, dtype=dt, name="input_proj")(layer4)
        # N(0, 1) as PyTorch's nn.Embedding (flax's default has std 1/sqrt(hidden_dim)): with
        # queries ~11x smaller than the sine positions, trained-from-scratch queries stayed alike
        # and all predicted the same blob (the demo's box AP: 1.1 after 2000 steps)
        query_embed = nn.Embed(cfg.num_queries, cfg.hidden_dim, embedding_init=nn.initializers.normal(1.0),
                               name="query_embed").embedding
        b = src.shape[0]
        flat = lambda t: t.reshape(b, -1, t.shape[-1])  # noqa: E731
        hs, memory = Transformer(cfg.hidden_dim, cfg.num_heads, cfg.dim_feedforward, cfg.enc_layers,
                                 cfg.dec_layers, cfg.dropout, cfg.pre_norm, dt, name="transformer")(
            flat(src), valid.reshape(b, -1), flat(pos), query_embed, deterministic=not train)
        memory = memory.reshape(src.shape)
        for i, f in enumerate(features):
            self.sow("intermediates", f"backbone_layer{i + 1}", f)
        self.sow("intermediates", "feature_mask", valid)
        self.sow("intermediates", "position_embedding", pos)
        self.sow("intermediates", "projected", src)
        self.sow("intermediates", "memory", memory)
        self.sow("intermediates", "decoder_hs", hs)

        logits = nn.Dense(cfg.num_logits, dtype=dt, name="class_embed")(hs).astype(jnp.float32)
        boxes = nn.sigmoid(MLP(cfg.hidden_dim, 4, 3, dt, name="bbox_embed")(hs).astype(jnp.float32))
        out: Dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        if cfg.masks:
            mask_sizes = [feature_sizes[3], feature_sizes[2], feature_sizes[1], feature_sizes[0]] \
                if padding_invariant else None
            fpns = [features[2], features[1], features[0]]
            attention_module, head = mask_modules(cfg, named=True)
            if mask_queries == 0:   # the per-image part of the mask head here, the per-query part in `mask_logits`
                sizes = list(mask_sizes) if mask_sizes is not None else [None] * 4
                shared, adapters = head.shared_features(src, fpns, sizes)
                out["mask_inputs"] = dict(queries=hs[-1], memory=memory, valid=valid, shared=shared,
                                          adapters=adapters, sizes=sizes)
                return out
            queries = hs[-1]
            selected = mask_queries is not None and mask_queries < cfg.num_queries
            if selected:
                indices, out["mask_score_cutoff"] = select_mask_queries(logits[-1], mask_queries)
                queries = jnp.take_along_axis(queries, indices[..., None], axis=1)
            attention = attention_module(queries, memory, valid)
            self.sow("intermediates", "attention_maps", attention)
            masks = head(src, attention, fpns, mask_sizes).astype(jnp.float32)
            if selected:
                masks = fill_skipped_masks(masks, indices, cfg.num_queries)
                out["mask_query_indices"] = indices
            out["pred_masks"] = masks
        return out


def build_model(config: ModelConfig) -> DETR:
    return DETR(config)


def init_variables(config: ModelConfig, rng, image_hw=(64, 64)) -> Dict[str, Any]:
    """Random variables (`params` and the frozen-BN `buffers`) for `config`, deterministic in `rng`.

    The initializers draw from an `rbg` key derived from `rng`: XLA compiles its RngBitGenerator
    about 4x faster on the CPU than threefry expanded for every parameter (11 s vs 39 s for the
    tiny config).
    """
    import jax

    key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
    x = jnp.zeros((1, *image_hw, 3), jnp.float32)
    m = jnp.ones((1, *image_hw), bool)
    return jax.jit(DETR(config).init)(key, x, m)


def count_params(variables: Optional[Dict[str, Any]]) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables.get("params", {})))
