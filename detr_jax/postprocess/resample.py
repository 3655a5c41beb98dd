"""Mask resampling as the original computes it, bit for bit, on the device (jnp) or the host (numpy).

- `resize_bilinear`: `F.interpolate(mode="bilinear", align_corners=False)` of each image's own
  region of a padded batch, with the original's float32 taps and FMA rounding (`_fma`); on the
  device the output rows are finished block by block (`_row_blocks`), optionally reduced there
  (e.g. thresholded), so the float values of all masks are never in memory at once.
- `resize_nearest`: `F.interpolate(mode="nearest")`; `pil_nearest_indices`: PIL's NEAREST resize
  (the original resizes its panoptic PNG with PIL).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def _fma(xp, a, b, c):
    """float32 `a * b + c` with one rounding, as the original's CPU kernels compute it (compiled
    with FMA contraction).  numpy: via float64 (a float32 product is exact there); jnp: with
    error-free transformations (Veltkamp/Dekker product, Knuth sum), in float32 only."""
    if xp is np:
        return (a.astype(np.float64) * b + c).astype(np.float32)
    p = a * b
    a_hi, b_hi = _split(a), _split(b)
    a_lo, b_lo = a - a_hi, b - b_hi
    p_err = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo   # a * b - p, exactly
    s = p + c
    v = s - p
    s_err = (p - (s - v)) + (c - v)                                         # p + c - s, exactly
    return s + (s_err + p_err)


def _split(x):
    """The high 12 bits of float32 `x` (Veltkamp's splitting with 2**12 + 1)."""
    t = x * np.float32(4097)
    return t - (t - x)


def _linear_taps(xp, src, dst, n_out: int, n_in: int):
    """Source indices and weights of `F.interpolate(bilinear, align_corners=False)` along one axis.

    src, dst: [B] ints (source and target lengths); returns i0, i1 [B, n_out] and l0, l1 [B, n_out]
    float32.  Positions at or beyond `dst` are clamped into the array (their values are junk).
    """
    f32 = np.float32
    scale = xp.asarray(src).astype(f32) / xp.asarray(dst).astype(f32)
    centers = xp.arange(n_out, dtype=f32) + f32(0.5)
    pos = _fma(xp, scale[:, None], centers[None, :], xp.full((1, n_out), -0.5, f32))
    pos = xp.maximum(pos, f32(0))
    i0 = pos.astype(xp.int32)
    l1 = xp.clip(pos - i0.astype(f32), f32(0), f32(1))
    l0 = f32(1) - l1
    i1 = i0 + (i0 < xp.asarray(src)[:, None] - 1).astype(xp.int32)
    return xp.minimum(i0, n_in - 1), xp.minimum(i1, n_in - 1), l0, l1


def _column_pass(xp, x, iw0, iw1, lw0, lw1):
    """[Q, H, W] -> [Q, H, Wo]: every source row resampled to the output columns, each output
    value fma(v0, l0, v1 * l1) as in the original's kernel."""
    return _fma(xp, x[:, :, iw0], lw0, x[:, :, iw1] * lw1)


def _row_pass(xp, across, ih0, ih1, lh0, lh1):
    """[Q, H, Wo] column-pass rows -> [Q, Ho, Wo]: each output row fma(top, l0, bottom * l1)."""
    return _fma(xp, across[:, ih0, :], lh0[:, None], across[:, ih1, :] * lh1[:, None])


_ROW_BLOCK = 32   # output rows per step of the row pass on the device


def _row_blocks(across, row_taps, reduce: Optional[Callable] = None, block: int = _ROW_BLOCK):
    """jnp: `reduce(_row_pass(across, *taps))` computed `block` output rows at a time, so that the
    [Q, Ho, Wo] values are never all in memory (and faster: BENCHMARKS.md, "Measurements behind
    design choices").
    `reduce` (None: the values themselves) maps values [Q, n, Wo] to arrays whose second-to-last
    axis is the n rows; the results are those arrays for all Ho rows."""
    reduce = reduce or (lambda values: values)
    n_out = len(row_taps[0])
    steps = -(-n_out // block)
    padded = [jnp.pad(t, (0, steps * block - n_out), mode="edge") for t in row_taps]

    def step(start):
        taps = [jax.lax.dynamic_slice_in_dim(t, start, block) for t in padded]
        return reduce(_row_pass(jnp, across, *taps))

    def unblock(y):   # [steps, ..., block, last] -> [..., steps * block, last][..., :n_out, :]
        y = jnp.moveaxis(y, 0, -3)
        return y.reshape(*y.shape[:-3], steps * block, y.shape[-1])[..., :n_out, :]
    return jax.tree_util.tree_map(unblock, jax.lax.map(step, jnp.arange(steps) * block))


def _resize_one(xp, x, row_taps, col_taps, reduce=None):
    """[Q, H, W] -> [Q, Ho, Wo] in the original's order: each output pixel is the 2-tap sum over
    rows of two 2-tap sums over columns.  A column sum depends only on the source row and the
    output column, so it is computed once per source row (`_column_pass`) and then combined per
    output row (`_row_pass`): the same values as per pixel, with less arithmetic.  row_taps,
    col_taps: `_linear_taps` (i0, i1, l0, l1) of the rows and the columns.  jnp: `reduce`
    (default: none) applied block by block (`_row_blocks`)."""
    across = _column_pass(xp, x, *col_taps)
    if xp is np:
        return _row_pass(np, across, *row_taps)
    return _row_blocks(across, row_taps, reduce)


def _bilinear_taps(xp, src_sizes, dst_sizes, out_hw, in_hw):
    """(row taps, column taps): `_linear_taps` (i0, i1, l0, l1) of both axes, each [B, Ho] / [B, Wo]."""
    return (_linear_taps(xp, src_sizes[:, 0], dst_sizes[:, 0], out_hw[0], in_hw[0]),
            _linear_taps(xp, src_sizes[:, 1], dst_sizes[:, 1], out_hw[1], in_hw[1]))


def resize_bilinear(x, src_sizes, dst_sizes, out_hw: Tuple[int, int], *, reduce: Optional[Callable] = None):
    """Resample each image's top-left `src_sizes[b]` region of `x` to `dst_sizes[b]`, bilinearly.

    x: [B, Q, H, W] (jnp or numpy; the result has the same kind); src_sizes, dst_sizes: [B, 2]
    (h, w), may be traced; out_hw: static (Ho, Wo) >= every dst size.  Returns [B, Q, Ho, Wo]
    float32 whose region [:dst_h, :dst_w] equals `F.interpolate(x[b:b+1, :, :src_h, :src_w],
    dst, mode="bilinear", align_corners=False)`; the rest is junk.  jnp only: `reduce` maps the
    values of a block of rows [Q, n, Wo] to what is returned instead (its rows on the second-to-
    last axis, e.g. thresholded masks), so the float values are never all in memory.
    """
    xp = np if isinstance(x, np.ndarray) else jnp
    src_sizes, dst_sizes = xp.asarray(src_sizes), xp.asarray(dst_sizes)
    row_taps, col_taps = _bilinear_taps(xp, src_sizes, dst_sizes, out_hw, x.shape[-2:])
    x = x.astype(xp.float32)
    if xp is np:
        return np.stack([_resize_one(np, x[b], tuple(t[b] for t in row_taps), tuple(t[b] for t in col_taps))
                         for b in range(len(x))])
    return jax.vmap(functools.partial(_resize_one, jnp, reduce=reduce))(x, row_taps, col_taps)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of `F.interpolate(mode="nearest")`: floor(i * float32(n_in / n_out))."""
    if n_in == n_out:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def resize_nearest(masks: np.ndarray, out_hw: Tuple[int, int]) -> np.ndarray:
    """[..., H, W] -> [..., Ho, Wo] with the nearest rule of `F.interpolate` (not half-pixel)."""
    rows = _nearest_indices(masks.shape[-2], out_hw[0])
    cols = _nearest_indices(masks.shape[-1], out_hw[1])
    return masks[..., rows[:, None], cols[None, :]]


@functools.lru_cache(maxsize=64)
def pil_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of PIL's NEAREST resize along one axis (PIL's own arithmetic: a row of
    indices resized by PIL itself, in its 32-bit integer mode)."""
    row = Image.fromarray(np.arange(n_in, dtype=np.int32)[None]).resize((n_out, 1), Image.NEAREST)
    return np.asarray(row, np.int64)[0]
