"""DETR: backbone + transformer + set-prediction heads, and the panoptic variant (DETRsegm).

Inputs: `pixel_values` float32 [B, H, W, 3], normalized with the ImageNet mean/std, zero-padded
at the bottom/right; `pixel_mask` bool [B, H, W], True on real pixels and False on padding
(the original DETR passes the opposite polarity, True on padding).

`DETR.__call__` returns one schema (dict), whatever its arguments:
  pred_logits  [B, Q, num_classes + 1]  float32; the last logit is "no object"
  pred_boxes   [B, Q, 4]                float32 (cx, cy, w, h) in [0, 1] of each unpadded image
  pred_masks   [B, Q, H/4, W/4]          float32 mask logits of every query on the padded stride-4
                                        grid (panoptic models only)
  aux_outputs  list of dec_layers - 1 dicts with pred_logits / pred_boxes of earlier layers
               (when `config.aux_loss`)

The mask head (most of the panoptic model's FLOPs) on chosen queries only is two explicit methods,
called with `module.apply(variables, ..., method=...)`:
  `DETR.detect`: the outputs above without `pred_masks`, and the `MaskFeatures` (the per-image part
    of the mask head and what its per-query part reads);
  `DETR.masks_of_queries(features, query_indices)`: mask logits [B, K, H/4, W/4] of the queries
    `query_indices` int [B, K], the same values as `pred_masks` at those queries.
Which queries get masks at inference is the runtime's policy (`detr_jax.runtime`).

Decoding extra queries alongside the model's own (training-time query denoising, parallel query
groups) is a third method:
  `DETR.detect_with_extra_queries(..., extra)`: `detect`'s outputs and features for Q + N queries,
    the model's Q followed by the N of `ExtraQueries` (their decoder input and positions, and a
    decoder self-attention mask).  When the mask keeps the first Q from seeing the others, their
    outputs are those of `detect`.  The extra queries hold no parameters of the model.

Padding: with `padding_invariant=True` (the default) every image in a padded batch gives what it
gives alone, unpadded: activations outside each image's valid region are zeroed after every
backbone and mask-head layer, GroupNorm statistics skip the padding, and feature masks come from
the exact stride arithmetic.  `padding_invariant=False` reproduces the original, where padding
changes the results (feature masks by nearest interpolation of the pixel mask).

Execution: `config.attention` chooses the attention implementation ("dense" or "blocked", the same
values) and `config.dtype` the compute dtype (parameters stay float32; outputs are float32).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from detr_jax.config import CONVNET_WIDTHS, ModelConfig
from detr_jax.models.backbone import ConvNet, ResNet
from detr_jax.models.layers import Conv1x1, image_sizes_from_mask, nearest_resize, valid_mask
from detr_jax.models.position import sine_position_embedding
from detr_jax.models.segmentation import MaskHeadSmallConv, MHAttentionMap
from detr_jax.models.transformer import Transformer

ABSTRACT_IMAGE_HW = (64, 64)   # the dummy image size that variable trees are built with (any size works)


@flax.struct.dataclass
class MaskFeatures:
    """What the mask head's per-query part reads, from `DETR.detect` (arrays lead with the batch).

    queries   [B, Q, C]           the last decoder layer's output (after its LayerNorm)
    memory    [B, h, w, C]        the encoder output at stride 32 (16 with DC5)
    valid     bool [B, h, w]      the feature mask of `memory`
    shared    [B, h, w, C + heads] lay1's convolution of the projected features (with its bias)
    adapters  tuple of 3           adapter1..3 of backbone stages 3, 2, 1
    sizes     tuple of 4           int32 [B, 2] valid sizes of [memory, stage 3, 2, 1], or Nones
                                  (`padding_invariant=False`)
    """

    queries: jnp.ndarray
    memory: jnp.ndarray
    valid: jnp.ndarray
    shared: jnp.ndarray
    adapters: Tuple[jnp.ndarray, ...]
    sizes: Tuple[Optional[jnp.ndarray], ...]


@flax.struct.dataclass
class ExtraQueries:
    """Queries decoded after the model's Q object queries (`DETR.detect_with_extra_queries`).

    content              [B, N, C]        their decoder input (the object queries' is zeros)
    pos                  [B, N, C]        their positional query (`query_pos`; the object queries'
                                          is `query_embed`)
    self_attention_mask  bool [Q+N, Q+N] or [B, Q+N, Q+N]: query i attends to query j in the
                                          decoder's self-attention only where True; queries are
                                          ordered as the outputs (the model's first)
    """

    content: jnp.ndarray
    pos: jnp.ndarray
    self_attention_mask: jnp.ndarray


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

    def setup(self):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        self.backbone = ConvNet(CONVNET_WIDTHS[cfg.backbone], dt) if cfg.is_convnet else \
            ResNet(cfg.resnet_depths, cfg.resnet_width, cfg.dilation, dt)
        self.input_proj = Conv1x1(cfg.hidden_dim, dtype=dt)
        # N(0, 1) as PyTorch's nn.Embedding (flax's default has std 1/sqrt(hidden_dim)): with
        # queries ~11x smaller than the sine positions, trained-from-scratch queries stayed alike
        # and all predicted the same blob (the demo's box AP: 1.1 after 2000 steps)
        self.query_embed = nn.Embed(cfg.num_queries, cfg.hidden_dim, embedding_init=nn.initializers.normal(1.0))
        self.transformer = Transformer(cfg.hidden_dim, cfg.num_heads, cfg.dim_feedforward, cfg.enc_layers,
                                       cfg.dec_layers, cfg.dropout, cfg.pre_norm, dt, cfg.attention)
        self.class_embed = nn.Dense(cfg.num_logits, dtype=dt)
        self.bbox_embed = MLP(cfg.hidden_dim, 4, 3, dt)
        if cfg.masks:
            self.bbox_attention = MHAttentionMap(cfg.hidden_dim, cfg.num_heads, dt)
            self.mask_head = MaskHeadSmallConv(cfg.hidden_dim, cfg.num_heads, dt)

    def __call__(self, pixel_values: jnp.ndarray, pixel_mask: jnp.ndarray, *, train: bool = False,
                 padding_invariant: bool = True) -> Dict[str, Any]:
        """The outputs of the module docstring: logits, boxes, every query's masks (panoptic), aux."""
        out, features = self.detect(pixel_values, pixel_mask, train=train, padding_invariant=padding_invariant)
        if self.config.masks:
            out["pred_masks"] = self.masks_of_all_queries(features)
        return out

    def detect(self, pixel_values: jnp.ndarray, pixel_mask: jnp.ndarray, *, train: bool = False,
               padding_invariant: bool = True) -> Tuple[Dict[str, Any], Optional[MaskFeatures]]:
        """(outputs without `pred_masks`, `MaskFeatures` or None for a detection model)."""
        return self._detect(pixel_values, pixel_mask, train, padding_invariant, None)

    def detect_with_extra_queries(self, pixel_values: jnp.ndarray, pixel_mask: jnp.ndarray, extra: ExtraQueries, *,
                                  train: bool = False, padding_invariant: bool = True
                                  ) -> Tuple[Dict[str, Any], Optional[MaskFeatures]]:
        """`detect` with the N queries of `extra` decoded after the model's Q: outputs (and
        `MaskFeatures.queries`) over Q + N queries, the model's first."""
        return self._detect(pixel_values, pixel_mask, train, padding_invariant, extra)

    def _detect(self, pixel_values, pixel_mask, train: bool, padding_invariant: bool, extra: Optional[ExtraQueries]):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        sizes = image_sizes_from_mask(pixel_mask) if padding_invariant else None
        features, feature_sizes = self.backbone(pixel_values, sizes)
        layer4 = features[-1]
        hw = layer4.shape[1:3]
        valid = valid_mask(feature_sizes[-1], hw) if padding_invariant else feature_masks(pixel_mask, hw)
        pos = sine_position_embedding(valid, cfg.hidden_dim // 2).astype(dt)
        src = self.input_proj(layer4)
        b = src.shape[0]
        flat = lambda t: t.reshape(b, -1, t.shape[-1])  # noqa: E731
        if extra is None:
            hs, memory = self.transformer(flat(src), valid.reshape(b, -1), flat(pos), self.query_embed.embedding,
                                          deterministic=not train)
        else:
            own = jnp.broadcast_to(self.query_embed.embedding, (b, *self.query_embed.embedding.shape))
            hs, memory = self.transformer(
                flat(src), valid.reshape(b, -1), flat(pos), jnp.concatenate([own, extra.pos.astype(own.dtype)], 1),
                deterministic=not train, query_content=jnp.concatenate([jnp.zeros_like(own), extra.content], 1),
                self_attention_mask=extra.self_attention_mask)
        memory = memory.reshape(src.shape)
        for i, f in enumerate(features):
            self.sow("intermediates", f"backbone_layer{i + 1}", f)
        self.sow("intermediates", "feature_mask", valid)
        self.sow("intermediates", "position_embedding", pos)
        self.sow("intermediates", "projected", src)
        self.sow("intermediates", "memory", memory)
        self.sow("intermediates", "decoder_hs", hs)

        logits = self.class_embed(hs).astype(jnp.float32)
        boxes = nn.sigmoid(self.bbox_embed(hs).astype(jnp.float32))
        out: Dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if cfg.aux_loss:
            out["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        if not cfg.masks:
            return out, None
        mask_sizes = (feature_sizes[3], feature_sizes[2], feature_sizes[1], feature_sizes[0]) \
            if padding_invariant else (None,) * 4
        shared, adapters = self.mask_head.shared_features(src, [features[2], features[1], features[0]],
                                                          list(mask_sizes))
        return out, MaskFeatures(queries=hs[-1], memory=memory, valid=valid, shared=shared, adapters=tuple(adapters),
                                 sizes=mask_sizes)

    def masks_of_queries(self, features: MaskFeatures, query_indices: jnp.ndarray) -> jnp.ndarray:
        """Mask logits float32 [B, K, H/4, W/4] of the queries `query_indices` int [B, K] (panoptic
        models), from `detect`'s features: the values `pred_masks` has at those queries."""
        queries = jnp.take_along_axis(features.queries, query_indices[..., None].astype(jnp.int32), axis=1)
        return self._masks(features, queries)

    def masks_of_all_queries(self, features: MaskFeatures) -> jnp.ndarray:
        """Mask logits float32 [B, Q, H/4, W/4] of every query of `detect`'s features: `pred_masks`."""
        return self._masks(features, features.queries)

    def _masks(self, features: MaskFeatures, queries: jnp.ndarray) -> jnp.ndarray:
        """The mask head's per-query part on the decoder outputs `queries` [B, K, C]."""
        attention = self.bbox_attention(queries, features.memory, features.valid)
        self.sow("intermediates", "attention_maps", attention)
        masks = self.mask_head.query_masks(features.shared, list(features.adapters), attention, list(features.sizes))
        return masks.astype(jnp.float32)


def build_model(config: ModelConfig) -> DETR:
    return DETR(config)


def _abstract_inputs(image_hw: Sequence[int] = ABSTRACT_IMAGE_HW):
    return jnp.zeros((1, *image_hw, 3), jnp.float32), jnp.ones((1, *image_hw), bool)


def abstract_variables(config: ModelConfig) -> Dict[str, Any]:
    """The variable tree of `config` ({'params', 'buffers'} for a ResNet) as `jax.ShapeDtypeStruct`
    leaves, float32 whatever `config.dtype`: nothing is allocated.  The one place that builds the
    tree without its values (checkpoint restore, the converter's expected shapes, the optimizer's
    parameter labels)."""
    return jax.eval_shape(DETR(config).init, jax.random.PRNGKey(0), *_abstract_inputs())


def init_variables(config: ModelConfig, rng, image_hw=ABSTRACT_IMAGE_HW) -> Dict[str, Any]:
    """Random variables (`params` and the frozen-BN `buffers`) for `config`, deterministic in `rng`.

    The initializers draw from an `rbg` key derived from `rng`: XLA compiles its RngBitGenerator
    much faster on the CPU than threefry expanded for every parameter.
    """
    key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
    return jax.jit(DETR(config).init)(key, *_abstract_inputs(image_hw))


def count_params(variables: Optional[Dict[str, Any]]) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables.get("params", {})))
