"""The panoptic head of DETR: box attention maps and the small FPN mask head (DETRsegm).

NHWC throughout.  `bbox_attention` gives, for every query, an 8-head attention map over the
encoder memory; `mask_head` turns [memory features, attention maps] into one mask logit map per
query at stride 4, through GroupNorm(8) convolutions and adapters over ResNet stages 3, 2, 1.

The first mask-head convolution is linear in its concatenated input `[features (C), maps (8)]`,
so it is computed as `conv(features)` once per image plus `conv(maps)` per query (same kernel,
split along its input channels), instead of convolving C + 8 channels for every query.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models.layers import Conv1x1, nearest_resize, valid_mask, zero_outside

GN_EPS = 1e-5
GN_GROUPS = 8


PIXEL_SUM_BLOCK = 32   # pixels summed per block before the blocks are summed (GroupNorm statistics)


def pixel_sums(x: jnp.ndarray, block: int = PIXEL_SUM_BLOCK) -> jnp.ndarray:
    """[N, H, W, C] -> [N, C]: per-channel sums over the pixels, in blocks of `block` pixels (zero
    padded) whose sums are then summed.  Two short sums instead of one over H x W terms: XLA:CPU
    vectorizes both over the channels, and the rounding error grows with the two lengths, not
    their product."""
    n, h, w, c = x.shape
    pixels = h * w
    padded = -(-pixels // block) * block
    blocks = jnp.pad(x.reshape(n, pixels, c), ((0, 0), (0, padded - pixels), (0, 0)))
    return blocks.reshape(n, padded // block, block, c).sum(axis=2).sum(axis=1)


class GroupNorm(nn.Module):
    """GroupNorm over (H, W, C / groups) per sample, statistics optionally over valid pixels only.

    x: [N, H, W, C]; `sizes`: int32 [N, 2] valid (h, w) or None (whole map, as PyTorch).  The
    output is normalized everywhere (also outside `sizes`; callers zero it there).  Statistics are
    two-pass (mean, then the mean squared deviation) from per-channel `pixel_sums` added up per
    group: faster on a CPU than reductions over (H, W, C / groups), and closer to float64
    (BENCHMARKS.md, "Measurements behind design choices").
    """

    num_groups: int = GN_GROUPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, sizes: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        n, h, w, c = x.shape
        per_group = c // self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        x = x.astype(jnp.float32)
        if sizes is None:
            masked, count = (lambda t: t), h * w * per_group
        else:
            keep = valid_mask(sizes, (h, w))[..., None]
            masked = lambda t: jnp.where(keep, t, jnp.zeros((), t.dtype))  # noqa: E731
            count = (sizes[:, :1] * sizes[:, 1:]).astype(jnp.float32) * per_group

        def per_channel_group_mean(t):   # [N, H, W, C] -> [N, 1, 1, C]: the mean of the channel's group
            group_sums = pixel_sums(masked(t)).reshape(n, self.num_groups, per_group).sum(axis=-1)
            return jnp.repeat(group_sums / count, per_group, axis=1)[:, None, None]

        mean = per_channel_group_mean(x)
        var = per_channel_group_mean(jnp.square(x - mean))
        y = (x - mean) * jax.lax.rsqrt(var + GN_EPS)
        return (y * scale + bias).astype(self.dtype)


class MHAttentionMap(nn.Module):
    """Attention of each query over the memory, per head: [B, Q, heads, h, w].

    One softmax over heads x h x w jointly (not per head); invalid memory positions get weight 0.
    """

    hidden_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, q: jnp.ndarray, memory: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
        """q: [B, Q, C]; memory: [B, h, w, C]; valid: bool [B, h, w]."""
        head_dim = self.hidden_dim // self.num_heads
        q = nn.Dense(self.hidden_dim, dtype=self.dtype, name="q_linear")(q)
        k = nn.Dense(self.hidden_dim, dtype=self.dtype, name="k_linear")(memory)  # == a 1x1 conv
        q = q.reshape(*q.shape[:2], self.num_heads, head_dim) * jnp.asarray(head_dim ** -0.5, self.dtype)
        k = k.reshape(*k.shape[:3], self.num_heads, head_dim)
        logits = jnp.einsum("bqnc,bhwnc->bqnhw", q, k).astype(jnp.float32)
        logits = jnp.where(valid[:, None, None], logits, -jnp.inf)
        b, nq = logits.shape[:2]
        weights = jax.nn.softmax(logits.reshape(b, nq, -1), axis=-1).reshape(logits.shape)
        return weights.astype(self.dtype)


def conv3x3(features: int, name: Optional[str], dtype: Any) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, name=name)


class SplitInputConv(nn.Module):
    """3x3 conv of `concat([shared, per_query])` as `conv(shared)` broadcast + `conv(per_query)`.

    shared: [B, h, w, Cs]; per_query: [B, Q, h, w, Cq] -> [B, Q, h, w, features].  The kernel is
    the usual HWIO [3, 3, Cs + Cq, features] (input channels: shared first).  `shared_part` and
    `query_part` are the two halves (`__call__` = `query_part(shared_part(shared), per_query)`).
    """

    features: int
    shared_channels: int
    query_channels: int
    dtype: Any = jnp.float32

    def setup(self):
        shape = (3, 3, self.shared_channels + self.query_channels, self.features)
        self.kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

    def _conv(self, x, k):
        return jax.lax.conv_general_dilated(x.astype(self.dtype), k.astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def shared_part(self, shared: jnp.ndarray) -> jnp.ndarray:
        """[B, h, w, Cs] -> [B, h, w, features]: the shared channels' conv plus the bias."""
        return self._conv(shared, self.kernel[:, :, :self.shared_channels]) + self.bias.astype(self.dtype)

    def query_part(self, out_shared: jnp.ndarray, per_query: jnp.ndarray) -> jnp.ndarray:
        """`shared_part`'s output and per_query [B, Q, h, w, Cq] -> [B, Q, h, w, features]."""
        b, nq = per_query.shape[:2]
        out_query = self._conv(per_query.reshape(b * nq, *per_query.shape[2:]), self.kernel[:, :, self.shared_channels:])
        return out_query.reshape(b, nq, *out_query.shape[1:]) + out_shared[:, None]

    def __call__(self, shared: jnp.ndarray, per_query: jnp.ndarray) -> jnp.ndarray:
        return self.query_part(self.shared_part(shared), per_query)


class MaskHeadSmallConv(nn.Module):
    """FPN-style mask head: per-query mask logits at the resolution of ResNet stage 1 (stride 4).

    Channels: [C + heads, C/2, C/4, C/8, C/16] with C = hidden_dim; adapters project stages 3,
    2, 1 to C/2, C/4, C/8.  Upsampling is PyTorch-exact nearest to each stage's size.
    `shared_features` is the per-image part, `query_masks` the per-query part.
    """

    hidden_dim: int
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        dt = self.dtype
        dims = [self.hidden_dim + self.num_heads] + [self.hidden_dim // 2 ** i for i in range(1, 5)]
        self.lay1 = SplitInputConv(dims[0], self.hidden_dim, self.num_heads, dt)
        self.gn1 = GroupNorm(GN_GROUPS, dt)
        self.lay2 = conv3x3(dims[1], None, dt)
        self.gn2 = GroupNorm(GN_GROUPS, dt)
        self.adapter1 = Conv1x1(dims[1], dtype=dt)
        self.lay3 = conv3x3(dims[2], None, dt)
        self.gn3 = GroupNorm(GN_GROUPS, dt)
        self.adapter2 = Conv1x1(dims[2], dtype=dt)
        self.lay4 = conv3x3(dims[3], None, dt)
        self.gn4 = GroupNorm(GN_GROUPS, dt)
        self.adapter3 = Conv1x1(dims[3], dtype=dt)
        self.lay5 = conv3x3(dims[4], None, dt)
        self.gn5 = GroupNorm(GN_GROUPS, dt)
        self.out_lay = conv3x3(1, None, dt)

    def shared_features(self, x: jnp.ndarray, fpns: Sequence[jnp.ndarray], sizes: Sequence[Optional[jnp.ndarray]]):
        """The per-image parts: lay1's conv of `x` (with its bias) and the adapters of `fpns`."""
        x = x if sizes[0] is None else zero_outside(x, sizes[0])
        adapters = [adapter(fpn.astype(self.dtype))
                    for adapter, fpn in zip((self.adapter1, self.adapter2, self.adapter3), fpns)]
        return self.lay1.shared_part(x), adapters

    def query_masks(self, shared: jnp.ndarray, adapters: Sequence[jnp.ndarray], attention: jnp.ndarray,
                    sizes: Sequence[Optional[jnp.ndarray]]) -> jnp.ndarray:
        """`shared_features`' outputs and attention [B, q, heads, h, w] -> mask logits [B, q, H1, W1]."""
        b, nq = attention.shape[:2]
        flat = lambda t: t.reshape(b * nq, *t.shape[2:])  # noqa: E731
        per_query_sizes = lambda s: None if s is None else jnp.repeat(s, nq, axis=0)  # noqa: E731
        keep = lambda t, s: t if s is None else zero_outside(t, s)  # noqa: E731
        norms = (self.gn1, self.gn2, self.gn3, self.gn4, self.gn5)

        def norm_relu(t, i, s):
            return keep(nn.relu(norms[i - 1](t, per_query_sizes(s))), per_query_sizes(s))

        maps = jnp.transpose(attention, (0, 1, 3, 4, 2))                     # [B, Q, h, w, heads]
        y = self.lay1.query_part(shared, maps)
        y = norm_relu(flat(y), 1, sizes[0])
        y = norm_relu(self.lay2(y), 2, sizes[0])
        for i, (adapter, s, lay) in enumerate(zip(adapters, sizes[1:], (self.lay3, self.lay4, self.lay5))):
            y = nearest_resize(y, adapter.shape[1:3])
            y = y.reshape(b, nq, *y.shape[1:]) + adapter[:, None]
            y = keep(flat(y), per_query_sizes(s))
            y = norm_relu(lay(y), i + 3, s)
        y = self.out_lay(y)
        return y.reshape(b, nq, *y.shape[1:3])

    def __call__(self, x: jnp.ndarray, attention: jnp.ndarray, fpns: Sequence[jnp.ndarray],
                 sizes: Optional[Sequence[jnp.ndarray]] = None) -> jnp.ndarray:
        """x: [B, h, w, C] projected features; attention: [B, Q, heads, h, w]; fpns: stages 3, 2, 1
        (NHWC); sizes: valid sizes of [x's level, stage 3, stage 2, stage 1] for padding invariance.

        Returns mask logits [B, Q, H1, W1] at stage 1's resolution.
        """
        sizes = list(sizes) if sizes is not None else [None] * 4
        shared, adapters = self.shared_features(x, fpns, sizes)
        return self.query_masks(shared, adapters, attention, sizes)
