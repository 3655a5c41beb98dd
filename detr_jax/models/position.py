"""Sine position embedding of DETR (a parameter-free function of the padding mask)."""
from __future__ import annotations

import math

import jax.numpy as jnp

EPS = 1e-6


def sine_position_embedding(valid: jnp.ndarray, num_pos_feats: int = 128, temperature: float = 10000.0,
                            normalize: bool = True, scale: float = 2 * math.pi) -> jnp.ndarray:
    """bool [B, H, W] (True on real pixels) -> float32 [B, H, W, 2 * num_pos_feats].

    Coordinates are cumulative counts of valid positions along each axis, normalized by the last
    row/column (+1e-6) and scaled to [0, 2*pi].  For each axis the channels interleave
    `sin(v / t_0), cos(v / t_1), sin(v / t_2), ...` with `t_i = temperature ** (2 * (i // 2) / F)`;
    the output is `[y part, x part]` along the channel axis, as in the original.
    """
    valid = valid.astype(jnp.float32)
    y = jnp.cumsum(valid, axis=1)
    x = jnp.cumsum(valid, axis=2)
    if normalize:
        y = y / (y[:, -1:, :] + EPS) * scale
        x = x / (x[:, :, -1:] + EPS) * scale
    i = jnp.arange(num_pos_feats, dtype=jnp.float32)
    dim_t = jnp.float32(temperature) ** (2 * jnp.floor(i / 2) / num_pos_feats)

    def encode(v: jnp.ndarray) -> jnp.ndarray:
        v = v[..., None] / dim_t
        return jnp.stack([jnp.sin(v[..., 0::2]), jnp.cos(v[..., 1::2])], axis=-1).reshape(*v.shape[:-1], -1)

    return jnp.concatenate([encode(y), encode(x)], axis=-1)
