"""Opt-in: PyTorch's CPU softmax argmax replayed bit for bit, for the panoptic tie pixels.

    from detr_jax.postprocess import postprocess_panoptic
    from detr_jax.postprocess.torch_softmax import torch_softmax_argmax
    results = postprocess_panoptic(logits, masks, sizes, tie_break=torch_softmax_argmax)

On a tie pixel (`panoptic.NEAR_TIE_GAP`) the original's choice is decided by the rounding of
PyTorch's kernel: SLEEF's expf (u10, with FMA), a sum in 16 lanes (AVX-512) folded by halving,
and a multiplication by the reciprocal of the sum.  This module redoes that arithmetic in numpy,
so it reproduces the original's maps where its torch ran that kernel; on hosts whose kernel
differs (another vector width, another exp) the original itself decides those pixels otherwise.
"""
from __future__ import annotations

import numpy as np

from detr_jax.postprocess.panoptic import _argmax_and_near_ties, _resolve_ties
from detr_jax.postprocess.resample import _fma

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


def torch_softmax_argmax(logits: np.ndarray) -> np.ndarray:
    """[K, n] -> int64 [n]: argmax over K of torch.softmax(logits, 0), float32 bit for bit."""
    e = _sleef_expf(logits - logits.max(0))
    return np.argmax(e * (np.float32(1) / _lane_sum(e)), axis=0)


def softmax_argmax(masks: np.ndarray, picked=None) -> np.ndarray:
    """argmax over K of torch.softmax(masks [K, h, w]) per pixel -> int64 [h, w].  `picked`:
    `_argmax_and_near_ties(masks)` when already computed (on the device)."""
    k, h, w = masks.shape
    x = masks.reshape(k, -1)
    if k == 1:
        return np.zeros((h, w), np.int64)
    best, near = picked if picked is not None else _argmax_and_near_ties(np, masks)
    return _resolve_ties(best, near, lambda pixels: x[:, pixels], torch_softmax_argmax)
