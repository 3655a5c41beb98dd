"""Post-processing of DETR outputs: scored boxes, instance masks and panoptic segments.

Inputs follow the model contract: `pred_logits` [B, Q, C+1] (the last logit is "no object"),
`pred_boxes` [B, Q, 4] (cx, cy, w, h) in [0, 1] of the UNPADDED image, `pred_masks`
[B, Q, Hp/4, Wp/4] mask logits on the stride-4 grid of the PADDED batch; `image_sizes` [B, 2]
(h, w) after resize and before padding; `orig_sizes` [B, 2] (h, w) of the original photos.

On a single unpadded image every function equals the original DETR's `PostProcess`,
`PostProcessSegm` and `PostProcessPanoptic` (same float32 bilinear taps as `F.interpolate(...,
align_corners=False)`, same nearest rule, same PIL NEAREST resize of the segment map).  On a padded
batch the original resamples the whole padded mask grid, so an image's masks depend on its batch
mates.  By default (`crop=True`) we first crop each image's own region of the grid,
`ceil(h / 4) x ceil(w / 4)` (conv1 and the max-pool each halve with ceiling), so an image gives
the same masks in any batch as alone; `crop=False` reproduces the original's padded-batch results.

Split between device and host:
- jittable `jnp` (static shapes; per-image sizes may be traced): `class_scores`, `box_predictions`,
  `resize_bilinear`, `instance_masks`;
- host `numpy`: everything with data-dependent shapes: per-image cropping and nearest resizing to
  the original size (`postprocess_instance_masks`), the panoptic bookkeeping (kept queries, stuff
  merging, the small-segment loop, the PIL resize, `postprocess_panoptic`) and PNG encoding.
`resize_bilinear` runs on numpy arrays too (same arithmetic).  The panoptic path resamples the
kept masks and takes the per-pixel argmax in jitted programs (`_KeptMasks`; the resampling is 13x
faster than numpy for 24 masks at 800x1066), its shapes bucketed (kept queries to a multiple of 8,
output to a multiple of 128) so that few shapes compile.
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from detr_jax.box_ops import box_cxcywh_to_xyxy
from detr_jax.panoptic_format import id_to_rgb, rgb_to_id

MASK_STRIDE = 4             # pred_masks is at stride 4 of the padded input
PANOPTIC_THRESHOLD = 0.85   # the original's PostProcessPanoptic default
MASK_THRESHOLD = 0.5        # PostProcessSegm: sigmoid(logit) > 0.5
MIN_SEGMENT_AREA = 4        # panoptic segments of at most this many pixels are dropped

IsThing = Union[Mapping[int, bool], Callable[[int], bool]]


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
    [Q, Ho, Wo] values are never all in memory (the photo case's 23 kept masks resampled to
    800x1066 and their per-pixel argmax: 93 ms as two programs over the whole [Q, Ho, Wo], 38 ms
    from the column pass this way, median of 9, interleaved).
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


def _resize_one(xp, x, ih0, ih1, lh0, lh1, iw0, iw1, lw0, lw1, reduce=None):
    """[Q, H, W] -> [Q, Ho, Wo] in the original's order: each output pixel is the 2-tap sum over
    rows of two 2-tap sums over columns.  A column sum depends only on the source row and the
    output column, so it is computed once per source row (`_column_pass`) and then combined per
    output row (`_row_pass`): the same values as per pixel, with less arithmetic.  jnp: `reduce`
    (default: none) applied block by block (`_row_blocks`)."""
    across = _column_pass(xp, x, iw0, iw1, lw0, lw1)
    if xp is np:
        return _row_pass(np, across, ih0, ih1, lh0, lh1)
    return _row_blocks(across, (ih0, ih1, lh0, lh1), reduce)


def _bilinear_taps(xp, src_sizes, dst_sizes, out_hw, in_hw):
    """(ih0, ih1, lh0, lh1, iw0, iw1, lw0, lw1), each [B, Ho] or [B, Wo]: `_linear_taps` of both axes."""
    return (*_linear_taps(xp, src_sizes[:, 0], dst_sizes[:, 0], out_hw[0], in_hw[0]),
            *_linear_taps(xp, src_sizes[:, 1], dst_sizes[:, 1], out_hw[1], in_hw[1]))


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
    taps = _bilinear_taps(xp, src_sizes, dst_sizes, out_hw, x.shape[-2:])
    x = x.astype(xp.float32)
    if xp is np:
        return np.stack([_resize_one(np, x[b], *(t[b] for t in taps)) for b in range(len(x))])
    return jax.vmap(functools.partial(_resize_one, jnp, reduce=reduce))(x, *taps)


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


# ----------------------------------------------------------------------------------------------
# Panoptic segmentation (host)

def default_is_thing(category_id: int) -> bool:
    """COCO panoptic: the listed categories' `isthing`; ids not listed count as things if <= 90
    (COCO's thing ids are the detection ids 1..90, stuff ids 92..200).  Unlike the original,
    which raises KeyError on an id its map lacks, any label is accepted."""
    from detr_jax.labels import panoptic_is_thing

    return panoptic_is_thing(category_id)


def panoptic_to_png(id_map: np.ndarray) -> np.ndarray:
    """Segment ids [H, W] -> uint8 [H, W, 3] with id = R + 256 G + 65536 B (the COCO panoptic PNG)."""
    return id_to_rgb(id_map)


def png_to_ids(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] panoptic PNG pixels -> segment ids int64 [H, W] (R + 256 G + 65536 B)."""
    return rgb_to_id(rgb)


# The original picks each pixel's segment as argmax(softmax over the kept queries), computed by
# PyTorch's CPU kernel.  That equals the plain argmax except where two queries' logits are so
# close that the float32 softmax rounds them to equal (the first one wins) or swaps them; there
# we redo the kernel's arithmetic exactly: SLEEF's expf (u10, with FMA), a sum in 16 lanes
# (AVX-512) folded by halving, and a multiplication by the reciprocal of the sum.
# Which pixels can differ: with m the top logit, the top query's exp(0) is exactly 1 and its
# probability p_top = 1 * r = r (r = 1 / sum); every other p_j = fl(e_j * r) <= r.  p_j can only
# equal r (and win as an earlier index) if e_j >= 1 - 2^-23 (the floats below 1 are 2^-24
# apart; this also covers a division instead of the reciprocal), i.e. if x_j - m >= -2^-22 even
# with a 1-ulp exp; below that gap the softmax argmax is the plain argmax.  We replay pixels with
# a gap up to 2^-21 (twice that bound; tests/test_postprocess.py checks both sides against torch).
_NEAR_TIE_GAP = 2.0 ** -21  # absolute logit gap up to which the exact softmax is replayed
_SUM_LANES = 16
_LN2_HI, _LN2_LO = np.float32(0.693145751953125), np.float32(1.428606765330187045e-06)
_EXP_POLY = (0.000198527617612853646278381, 0.00139304355252534151077271, 0.00833336077630519866943359,
             0.0416664853692054748535156, 0.166666671633720397949219, 0.5)


def _sleef_expf(d: np.ndarray) -> np.ndarray:
    """float32 exp(d) bit-exactly as SLEEF's `expf_u10` (PyTorch's vectorised exp on CPU)."""
    q = np.rint(d * np.float32(1.4426950408889634)).astype(np.int32)
    s = _fma(np, q.astype(np.float32), -_LN2_HI, d)
    s = _fma(np, q.astype(np.float32), -_LN2_LO, s)
    u = np.full_like(s, _EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        u = _fma(np, u, s, np.float32(c))
    u = np.float32(1) + _fma(np, s * s, u, s)
    u = np.ldexp(u, q).astype(np.float32)
    return np.where(d < -104, np.float32(0), u)


def _lane_sum(e: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of e [K, N] in the order of PyTorch's `vec::reduce_all` (float32)."""
    k = len(e)
    if k < _SUM_LANES:
        total = e[0]
        for row in e[1:]:
            total = total + row
        return total
    padded = np.zeros((-(-k // _SUM_LANES) * _SUM_LANES,) + e.shape[1:], np.float32)
    padded[:k] = e
    acc = padded[:_SUM_LANES]
    for start in range(_SUM_LANES, len(padded), _SUM_LANES):
        acc = acc + padded[start:start + _SUM_LANES]
    step = _SUM_LANES // 2
    while step:
        acc = acc + acc[np.arange(_SUM_LANES) ^ step]
        step //= 2
    return acc[0]


def _argmax_and_near_ties(xp, rows):
    """rows: K arrays [...] (or one [K, ...]) -> (argmax over K, the first on a tie; whether the
    runner-up is within the near-tie gap).  One pass over the rows, unrolled: on the device XLA
    fuses it into one loop over the pixels (its variadic argmax reduce over 24 x 896 x 1152 took
    168 ms on 2 cores, this 12-15 ms)."""
    first, *rest = rows
    top, second, best = first, xp.full_like(first, -xp.inf), xp.zeros(first.shape, xp.int32)
    for k, x in enumerate(rest, 1):
        second = xp.maximum(second, xp.minimum(top, x))   # the runner-up (== top on a tie)
        best = xp.where(x > top, k, best)                 # the first row wins a tie
        top = xp.maximum(top, x)
    return best, top - second <= _NEAR_TIE_GAP


def _softmax_argmax(masks: np.ndarray, picked=None) -> np.ndarray:
    """argmax over K of torch.softmax(masks [K, h, w]) per pixel -> int64 [h, w].  `picked`:
    `_argmax_and_near_ties(masks)` when already computed (on the device)."""
    k, h, w = masks.shape
    x = masks.reshape(k, -1)
    if k == 1:
        return np.zeros((h, w), np.int64)
    best, near = picked if picked is not None else _argmax_and_near_ties(np, masks)
    return _replay_near_ties(best, near, lambda pixels: x[:, pixels])


def _replay_near_ties(best, near, logits_at: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`best` [h, w] (the plain argmax) with its `near` [h, w] pixels redone as torch's softmax
    argmax, from `logits_at(flat pixel indices)` -> [K, n] -> int64 [h, w]."""
    h, w = best.shape
    best, near = np.asarray(best, np.int64).reshape(-1), np.flatnonzero(np.asarray(near).reshape(-1))
    if len(near):
        best[near] = _torch_softmax_argmax(logits_at(near))
    return best.reshape(h, w)


def _torch_softmax_argmax(logits: np.ndarray) -> np.ndarray:
    """[K, n] -> int64 [n]: argmax over K of torch.softmax(logits, 0), float32 bit for bit."""
    e = _sleef_expf(logits - logits.max(0))
    return np.argmax(e * (np.float32(1) / _lane_sum(e)), axis=0)


@functools.lru_cache(maxsize=64)
def pil_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source indices of PIL's NEAREST resize along one axis (PIL's own arithmetic: a row of
    indices resized by PIL itself, in its 32-bit integer mode)."""
    row = Image.fromarray(np.arange(n_in, dtype=np.int32)[None]).resize((n_out, 1), Image.NEAREST)
    return np.asarray(row, np.int64)[0]


def _segment_map(winner: np.ndarray, merge: Sequence[Sequence[int]], orig_hw) -> np.ndarray:
    """Index of the winning kept query per pixel (`winner` [h, w]), the stuff queries of one class
    merged into the first, at the original size: the original's ids -> PNG -> PIL NEAREST resize
    -> ids, done on the ids with PIL's indices (nearest moves values, it never mixes them)."""
    m_id = winner.copy()
    for equiv in merge:  # stuff queries of one class all become the first of them
        m_id[np.isin(m_id, equiv)] = equiv[0]
    rows = pil_nearest_indices(m_id.shape[0], int(orig_hw[0]))
    cols = pil_nearest_indices(m_id.shape[1], int(orig_hw[1]))
    return m_id[rows[:, None], cols[None, :]]


_KEPT_MULTIPLE, _OUT_MULTIPLE = 8, 128   # shape buckets of `_column_pass_of` and `_pick`
_PAD_LOGIT = -1e30                       # mask logit of the padding queries (never picked)


@functools.partial(jax.jit, static_argnames=("out_hw",))
def _column_pass_of(masks, src_hw, size_hw, out_hw):
    """masks [K, H, W] -> (their column pass [K, H, Wo], the row taps (i0, i1, l0, l1) [Ho]) of
    `resize_bilinear` of each mask's top-left `src_hw` region to `size_hw` (`_logits_at` and
    `_pick` finish the resampling; output pixels beyond `size_hw` are junk)."""
    taps = [t[0] for t in _bilinear_taps(jnp, src_hw[None], size_hw[None], out_hw, masks.shape[-2:])]
    return _column_pass(jnp, masks.astype(jnp.float32), *taps[4:]), tuple(taps[:4])


@jax.jit
def _pick(across, row_taps, rows):
    """(argmax, near ties) [Ho, Wo] over the resampled masks (`_column_pass_of`'s outputs) whose
    `rows` [K] is >= 0 (the others are left out), the argmax given as that mask's `rows` value;
    computed a block of output rows at a time, so the [K, Ho, Wo] logits are never all in memory."""
    def reduce(values):   # [K, n, Wo] -> ([n, Wo], [n, Wo])
        return _argmax_and_near_ties(jnp, [jnp.where(row >= 0, x, -jnp.inf) for row, x in zip(rows, values)])
    best, near = _row_blocks(across, row_taps, reduce)
    return rows[best], near


_NEAR_MULTIPLE = 4096       # `_logits_at` gathers near-tie pixels in multiples of this many


@jax.jit
def _logits_at(across, row_taps, rows, cols):
    """The resampled mask logits [K, n] at the output pixels (rows [n], cols [n]): `_row_pass` of
    those pixels alone (the same float32 operations, so the same values as `_pick` compared)."""
    ih0, ih1, lh0, lh1 = (t[rows] for t in row_taps)
    return _fma(jnp, across[:, ih0, cols], lh0, across[:, ih1, cols] * lh1)


class _KeptMasks:
    """The kept masks resampled on the device, in shapes padded to the buckets, with the per-pixel
    softmax argmax over any subset of them (`softmax_argmax`), and over fewer of them from that
    result (`narrowed`: the small-segment loop re-picks only where a dropped mask won or near a
    tie).  The device holds the column pass of the resampling ([K, h / 4, w], 24 masks of the photo
    case 22 MB); the argmax finishes the rows block by block, and only the logits of near-tie
    pixels are computed in full and come back to the host (all 24 masks at 800x1066 would be 99
    MB)."""

    def __init__(self, masks: np.ndarray, src_hw, size_hw):
        k, self.h, self.w = len(masks), int(size_hw[0]), int(size_hw[1])
        padded = np.full((-(-k // _KEPT_MULTIPLE) * _KEPT_MULTIPLE, *masks.shape[1:]), _PAD_LOGIT, np.float32)
        padded[:k] = masks
        out_hw = (-(-self.h // _OUT_MULTIPLE) * _OUT_MULTIPLE, -(-self.w // _OUT_MULTIPLE) * _OUT_MULTIPLE)
        self.across, self.row_taps = _column_pass_of(padded, np.asarray(src_hw, np.int32),
                                                     np.asarray(size_hw, np.int32), out_hw)

    def pick(self, subset: np.ndarray):
        """(argmax in 0..len(subset)-1, near ties) [h, w] over the masks `subset` (sorted indices)."""
        rows = np.full(len(self.across), -1, np.int32)
        rows[subset] = np.arange(len(subset), dtype=np.int32)
        best, near = jax.device_get(_pick(self.across, self.row_taps, rows))
        return best[:self.h, :self.w], near[:self.h, :self.w]

    def logits_at(self, subset: np.ndarray, pixels: np.ndarray) -> np.ndarray:
        """[len(subset), n] logits of the masks `subset` at `pixels` (flat indices into h x w)."""
        n = len(pixels)
        padded = np.zeros(-(-n // _NEAR_MULTIPLE) * _NEAR_MULTIPLE, np.int64)
        padded[:n] = pixels
        rows, cols = np.divmod(padded, self.w)
        logits = _logits_at(self.across, self.row_taps, rows.astype(np.int32), cols.astype(np.int32))
        return np.asarray(logits)[subset, :n]

    def softmax_argmax(self, subset: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(int64 [h, w]: per pixel the index into `subset` of torch's softmax argmax over those
        masks; bool [h, w]: the pixels where a sub-subset's argmax may not follow from it, for
        `narrowed`)."""
        if len(subset) == 1:
            return self._without_choice()
        best, near = self.pick(subset)
        return _replay_near_ties(best, near, lambda pixels: self.logits_at(subset, pixels)), near

    def narrowed(self, winner: np.ndarray, unsure: np.ndarray, subset: np.ndarray, keep: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """`softmax_argmax(subset[keep])` from `(winner, unsure) = softmax_argmax(subset)` (or a
        previous `narrowed`), recomputing only the pixels whose winner is left out or that are
        `unsure`; `keep`: bool [len(subset)] (with none kept, the map is all 0, as for one mask).

        Exact: away from `unsure` pixels the runner-up logit is more than the near-tie gap below
        the winner's, and leaving other masks out only widens that gap, so the winner stays torch's
        softmax argmax; the other pixels get torch's softmax replayed over the remaining masks."""
        remaining = subset[keep]
        if len(remaining) <= 1:
            return self._without_choice()
        winner = np.where(keep, np.cumsum(keep) - 1, -1)[winner]   # -1: the winner was left out
        unsure = unsure | (winner < 0)
        return _replay_near_ties(winner, unsure, lambda pixels: self.logits_at(remaining, pixels)), unsure

    def _without_choice(self) -> Tuple[np.ndarray, np.ndarray]:
        """`softmax_argmax`'s result over one mask: index 0 everywhere, no pixel unsure."""
        return np.zeros((self.h, self.w), np.int64), np.zeros((self.h, self.w), bool)


def _panoptic_one(logits, masks, src_hw, size_hw, orig_hw, is_thing, threshold) -> Dict[str, Any]:
    scores, labels = (np.asarray(a) for a in class_scores(jnp.asarray(logits), include_no_object=True))
    kept = np.flatnonzero((labels != logits.shape[-1] - 1) & (scores > threshold))
    h, w = int(size_hw[0]), int(size_hw[1])
    resampled = _KeptMasks(np.asarray(masks)[kept], src_hw, (h, w)) if len(kept) else None
    subset = np.arange(len(kept))
    classes = labels[kept]
    stuff = defaultdict(list)
    for k, label in enumerate(classes):
        if not is_thing(int(label)):
            stuff[int(label)].append(k)
    merge = [equiv for equiv in stuff.values() if len(equiv) > 1]
    winner, unsure = resampled.softmax_argmax(subset) if len(kept) else (np.zeros((h, w), np.int64), None)
    id_map = _segment_map(winner, merge, orig_hw)
    area = np.bincount(id_map.ravel(), minlength=len(kept))[:len(kept)]
    while len(kept) and (area <= MIN_SEGMENT_AREA).any():  # drop tiny segments, redo without merging
        big = area > MIN_SEGMENT_AREA
        winner, unsure = resampled.narrowed(winner, unsure, subset, big)
        kept, classes, subset = kept[big], classes[big], subset[big]
        id_map = _segment_map(winner, [], orig_hw)
        area = np.bincount(id_map.ravel(), minlength=len(kept))[:len(kept)]
    segments = [{"id": i, "isthing": bool(is_thing(int(c))), "category_id": int(c), "area": int(a)}
                for i, (c, a) in enumerate(zip(classes, area))]
    return {"id_map": id_map.astype(np.int32), "segments_info": segments,
            "scores": scores[kept], "query_indices": kept.astype(np.int32)}


def postprocess_panoptic(pred_logits, pred_masks, image_sizes, orig_sizes=None, *,
                         is_thing_map: Optional[IsThing] = None, threshold: float = PANOPTIC_THRESHOLD,
                         crop: bool = True) -> List[Dict[str, Any]]:
    """The original `PostProcessPanoptic`, per image, on the host (numpy).

    Keeps queries whose max softmax over ALL C+1 logits exceeds `threshold` and whose argmax is
    not "no object"; resamples their masks bilinearly to the processed size (h, w) (crop=True:
    from the image's own grid region; crop=False: from the whole padded grid, as the original);
    assigns each pixel to the query of highest softmax; merges stuff queries of one class into the
    first; resizes the map to `orig_sizes` (default: the processed size) with PIL NEAREST; then,
    while some segment has area <= 4 pixels, drops those and redoes the map WITHOUT the merge.

    is_thing_map: {category_id: bool} or a callable; default `default_is_thing`.
    Returns per image: `id_map` int32 [H0, W0] (segment id = index in `segments_info`; an image
    with no kept query gives zeros and an empty list), `segments_info` [{id, isthing, category_id,
    area}], and per segment its `scores` and `query_indices`.
    """
    if is_thing_map is None:
        is_thing = default_is_thing
    elif callable(is_thing_map):
        is_thing = is_thing_map
    else:
        is_thing = is_thing_map.__getitem__
    logits, masks = np.asarray(pred_logits, np.float32), np.asarray(pred_masks, np.float32)
    image_sizes = np.asarray(image_sizes)
    orig_sizes = image_sizes if orig_sizes is None else np.asarray(orig_sizes)
    src, dst = _mask_regions(np, masks.shape[-2:], image_sizes, crop, "panoptic")
    return [_panoptic_one(logits[b], masks[b], src[b], dst[b], orig_sizes[b], is_thing, threshold)
            for b in range(len(logits))]
