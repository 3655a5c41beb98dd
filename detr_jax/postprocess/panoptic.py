"""The original's `PostProcessPanoptic`: one segment map per image, on the host with the
resampling and the per-pixel pick on the device (`_KeptMasks`).

Which pixels count as ties.  The original assigns each pixel to argmax(softmax over the kept
queries' resampled mask logits), computed by PyTorch's CPU kernel in float32.  With m the top
logit, the top query's exp(0) is exactly 1 and its probability is r = 1 / sum; every other
p_j = fl(e_j * r) <= r, so the softmax argmax is the plain argmax (first index on equal logits)
except where some other query's probability rounds to exactly r and it comes first, which needs
e_j >= 1 - 2^-23, i.e. x_j >= m - 2^-22 (also with a 1-ulp exp or a division instead of the
reciprocal).  A pixel is a TIE when its runner-up logit is within `NEAR_TIE_GAP` = 2^-21 (twice
that bound) of its top logit: there the original's own decision depends on the rounding of its
kernel (SLEEF's expf and a 16-lane sum on AVX-512 hosts, something else elsewhere).

By default a tie goes to the first of the tied queries (the plain argmax): every pixel that is not
a tie is the original's.  `tie_break` replays a given rule on the tie pixels only, e.g.
`detr_jax.postprocess.torch_softmax.torch_softmax_argmax`, PyTorch's CPU kernel bit for bit on
the hosts it was written for (opt-in, `torch_softmax`).
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from detr_jax.panoptic_format import id_to_rgb, rgb_to_id
from detr_jax.postprocess.detection import MIN_SEGMENT_AREA, PANOPTIC_THRESHOLD, _mask_regions, class_scores
from detr_jax.postprocess.resample import _bilinear_taps, _column_pass, _fma, _row_blocks, pil_nearest_indices

IsThing = Union[Mapping[int, bool], Callable[[int], bool]]
TieBreak = Callable[[np.ndarray], np.ndarray]   # logits [K, n] at n tie pixels -> the winner [n] in 0..K-1
NEAR_TIE_GAP = 2.0 ** -21   # a pixel whose runner-up logit is this close to its top one is a tie


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


def _argmax_and_near_ties(xp, rows):
    """rows: K arrays [...] (or one [K, ...]) -> (argmax over K, the first on a tie; whether the
    runner-up is within the near-tie gap).  One pass over the rows, unrolled: on the device XLA
    fuses it into one loop over the pixels (faster than its variadic argmax reduce: BENCHMARKS.md,
    "Measurements behind design choices")."""
    first, *rest = rows
    top, second, best = first, xp.full_like(first, -xp.inf), xp.zeros(first.shape, xp.int32)
    for k, x in enumerate(rest, 1):
        second = xp.maximum(second, xp.minimum(top, x))   # the runner-up (== top on a tie)
        best = xp.where(x > top, k, best)                 # the first row wins a tie
        top = xp.maximum(top, x)
    return best, top - second <= NEAR_TIE_GAP


def _first_wins(logits: np.ndarray) -> np.ndarray:
    """The default tie rule: [K, n] -> int64 [n], the first of the top logits."""
    return np.argmax(logits, axis=0)


def _resolve_ties(best, near, logits_at: Callable[[np.ndarray], np.ndarray], tie_break: TieBreak) -> np.ndarray:
    """`best` [h, w] (the plain argmax) with its `near` [h, w] pixels decided by `tie_break` from
    `logits_at(flat pixel indices)` -> [K, n]; -> int64 [h, w]."""
    h, w = best.shape
    best, near = np.asarray(best, np.int64).reshape(-1), np.flatnonzero(np.asarray(near).reshape(-1))
    if len(near):
        best[near] = tie_break(logits_at(near))
    return best.reshape(h, w)


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
    row_taps, col_taps = (tuple(t[0] for t in taps)
                          for taps in _bilinear_taps(jnp, src_hw[None], size_hw[None], out_hw, masks.shape[-2:]))
    return _column_pass(jnp, masks.astype(jnp.float32), *col_taps), row_taps


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
    pick over any subset of them (`softmax_argmax`: the argmax, ties decided by `tie_break`), and
    over fewer of them from that result (`narrowed`: the small-segment loop re-picks only where a
    dropped mask won or at a tie).  The device holds the column pass of the resampling ([K, h / 4, w], 24 masks of the photo
    case 22 MB); the argmax finishes the rows block by block, and only the logits of near-tie
    pixels are computed in full and come back to the host (all 24 masks at 800x1066 would be 99
    MB)."""

    def __init__(self, masks: np.ndarray, src_hw, size_hw, tie_break: TieBreak = _first_wins):
        k, self.h, self.w = len(masks), int(size_hw[0]), int(size_hw[1])
        self.tie_break = tie_break
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
        """(int64 [h, w]: per pixel the index into `subset` of the softmax argmax over those masks,
        ties decided by `tie_break`; bool [h, w]: the tie pixels, where a sub-subset's pick may not
        follow from it, for `narrowed`)."""
        if len(subset) == 1:
            return self._without_choice()
        best, near = self.pick(subset)
        return _resolve_ties(best, near, lambda pixels: self.logits_at(subset, pixels), self.tie_break), near

    def narrowed(self, winner: np.ndarray, unsure: np.ndarray, subset: np.ndarray, keep: np.ndarray
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """`softmax_argmax(subset[keep])` from `(winner, unsure) = softmax_argmax(subset)` (or a
        previous `narrowed`), recomputing only the pixels whose winner is left out or that are
        `unsure`; `keep`: bool [len(subset)] (with none kept, the map is all 0, as for one mask).

        Exact: away from `unsure` pixels the runner-up logit is more than the tie gap below the
        winner's, and leaving other masks out only widens that gap, so the winner stays the pick;
        the other pixels are picked again over the remaining masks (ties by `tie_break`)."""
        remaining = subset[keep]
        if len(remaining) <= 1:
            return self._without_choice()
        winner = np.where(keep, np.cumsum(keep) - 1, -1)[winner]   # -1: the winner was left out
        unsure = unsure | (winner < 0)
        resolve = lambda pixels: self.logits_at(remaining, pixels)   # noqa: E731
        return _resolve_ties(winner, unsure, resolve, self.tie_break), unsure

    def _without_choice(self) -> Tuple[np.ndarray, np.ndarray]:
        """`softmax_argmax`'s result over one mask: index 0 everywhere, no pixel unsure."""
        return np.zeros((self.h, self.w), np.int64), np.zeros((self.h, self.w), bool)


def _panoptic_one(logits, masks, src_hw, size_hw, orig_hw, *, is_thing: Callable[[int], bool], threshold: float,
                  tie_break: TieBreak) -> Dict[str, Any]:
    scores, labels = (np.asarray(a) for a in class_scores(jnp.asarray(logits), include_no_object=True))
    kept = np.flatnonzero((labels != logits.shape[-1] - 1) & (scores > threshold))
    h, w = int(size_hw[0]), int(size_hw[1])
    resampled = _KeptMasks(np.asarray(masks)[kept], src_hw, (h, w), tie_break) if len(kept) else None
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
                         crop: bool = True, tie_break: Optional[TieBreak] = None) -> List[Dict[str, Any]]:
    """The original `PostProcessPanoptic`, per image, on the host (numpy).

    Keeps queries whose max softmax over ALL C+1 logits exceeds `threshold` and whose argmax is
    not "no object"; resamples their masks bilinearly to the processed size (h, w) (crop=True:
    from the image's own grid region; crop=False: from the whole padded grid, as the original);
    assigns each pixel to the query of highest softmax (on a tie pixel, see the module docstring,
    the first of the tied queries, or `tie_break`'s choice); merges stuff queries of one class into the
    first; resizes the map to `orig_sizes` (default: the processed size) with PIL NEAREST; then,
    while some segment has area <= 4 pixels, drops those and redoes the map WITHOUT the merge.

    is_thing_map: {category_id: bool} or a callable; default `default_is_thing`.
    tie_break: logits [K, n] at the tie pixels -> the winners [n] (default: the first top one),
    e.g. the opt-in `torch_softmax.torch_softmax_argmax`.
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
    return [_panoptic_one(logits[b], masks[b], src[b], dst[b], orig_sizes[b], is_thing=is_thing,
                          threshold=threshold, tie_break=tie_break or _first_wins)
            for b in range(len(logits))]
