"""Small building blocks shared by the DETR modules: PyTorch-exact resizing and valid regions.

Conventions: feature maps are NHWC.  A *valid region* is the top-left `(h, w)` rectangle of an
image inside a bottom/right-padded batch; `sizes` is int32 [B, 2] holding each image's `(h, w)`
at the resolution of the array it describes.  `valid` masks are True on real (unpadded) pixels.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of `F.interpolate(mode='nearest')` along one axis (static shapes).

    PyTorch computes `min(floor(dst * float32(in / out)), in - 1)` in float32, with exact
    shortcuts for equal sizes and for an exact 2x upsampling.  This is NOT the half-pixel
    convention of `jax.image.resize`.
    """
    dst = np.arange(out_size)
    if in_size == out_size:
        return dst
    if out_size == 2 * in_size:
        return dst >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def nearest_resize(x: jnp.ndarray, out_hw: Tuple[int, int], axes: Tuple[int, int] = (1, 2)) -> jnp.ndarray:
    """Nearest resize of the two spatial `axes` of `x` to `out_hw`, exactly as PyTorch does.

    Where PyTorch's indices are those of an integer upsampling (`dst // f`, e.g. 134 -> 267 in
    the mask head's FPN), a repeat and crop instead of a gather: the same values, and a backward
    pass of sums rather than a scatter.
    """
    for axis, out in zip(axes, out_hw):
        size = x.shape[axis]
        indices = nearest_indices(size, out)
        factor = -(-out // size)
        if np.array_equal(indices, np.arange(out) // factor):
            x = jax.lax.slice_in_dim(jnp.repeat(x, factor, axis=axis) if factor > 1 else x, 0, out, axis=axis)
        else:
            x = jnp.take(x, indices, axis=axis)
    return x


def image_sizes_from_mask(pixel_mask: jnp.ndarray) -> jnp.ndarray:
    """bool [B, H, W] (True on pixels, padding at the bottom/right) -> int32 [B, 2] of (h, w)."""
    rows = jnp.any(pixel_mask, axis=2).sum(axis=1)
    cols = jnp.any(pixel_mask, axis=1).sum(axis=1)
    return jnp.stack([rows, cols], axis=1).astype(jnp.int32)


def downsample_sizes(sizes: jnp.ndarray) -> jnp.ndarray:
    """Valid sizes after a stride-2 layer with PyTorch's symmetric padding: `ceil(n / 2)`.

    Holds for every stride-2 layer of the ResNet: 7x7 pad 3, 3x3 pad 1, 1x1 pad 0 and the 3x3
    max-pool with pad 1 all give `(n - 1) // 2 + 1` outputs.
    """
    return (sizes + 1) // 2


def valid_mask(sizes: jnp.ndarray, hw: Sequence[int]) -> jnp.ndarray:
    """bool [B, H, W], True inside each image's valid `(h, w)` rectangle."""
    rows = jnp.arange(hw[0])[None, :, None] < sizes[:, 0, None, None]
    cols = jnp.arange(hw[1])[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def zero_outside(x: jnp.ndarray, sizes: jnp.ndarray) -> jnp.ndarray:
    """Zero the NHWC activations outside each image's valid region.

    With this after every layer, a convolution near the border of an image in a padded batch
    reads the same zeros as PyTorch's zero padding of the image alone.
    """
    keep = valid_mask(sizes, x.shape[1:3])[..., None]
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


class Conv1x1(nn.Module):
    """A 1x1 convolution (`nn.Conv(features, (1, 1), strides=stride)`'s parameters: kernel HWIO
    [1, 1, Cin, features], optional bias) computed as a matrix product over channels.

    NHWC in and out.  Same values as the convolution (stride s keeps pixels 0, s, 2s, ..., as
    PyTorch's unpadded strided 1x1 conv), but XLA's CPU backend runs a dot much faster than a 1x1
    convolution, forward and backward (its kernel gradient as a convolution is slow).
    """

    features: int
    stride: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
        if self.stride > 1:
            x = x[:, ::self.stride, ::self.stride]
        y = jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y
