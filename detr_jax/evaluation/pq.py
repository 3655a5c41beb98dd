"""Panoptic quality (PQ = SQ x RQ, Kirillov et al. 2019) exactly as the COCO panopticapi computes it.

Conventions of the COCO panoptic format:
- a PNG holds segment ids as colours, id = R + 256 G + 256^2 B; id 0 (`VOID`) is unlabeled;
- a predicted and a ground-truth segment of one category match when IoU > 0.5 (strictly), where
  the union leaves out the part of the prediction lying on VOID ground truth;
- crowd ground-truth segments (iscrowd=1) are never matched nor counted as false negatives;
- an unmatched prediction is not a false positive when more than half of its area lies on VOID
  or on the crowd region of its category (the last crowd segment of that category in
  `segments_info`, as in panopticapi);
- per category PQ = sum(IoU of TP) / (TP + FP/2 + FN/2), SQ = sum(IoU of TP) / TP,
  RQ = TP / (TP + FP/2 + FN/2); the means skip categories with no TP, FP nor FN.

    stats = pq_stats_from_arrays(gt_ids, gt_segments, pred_ids, pred_segments, categories)
    total = merge_pq_stats(total, stats)          # accumulate over images
    results = pq_average(total, categories)       # {'All', 'Things', 'Stuff', 'per_class'}
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from detr_jax.panoptic_format import ID_LIMIT, VOID, read_id_map

log = logging.getLogger(__name__)
OFFSET = ID_LIMIT  # ids are below 2**24, so a (gt, pred) pair packs into one int64 key
MATCH_IOU = 0.5  # a match needs IoU strictly above this
IGNORED_FRACTION = 0.5  # an unmatched prediction more than this much on VOID/crowd is no FP

Categories = Union[Mapping[int, Mapping[str, Any]], Sequence[Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class PQStat:
    """Sums for one category: IoU of the true positives, and the TP, FP and FN counts."""
    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: "PQStat") -> "PQStat":
        return PQStat(self.iou + other.iou, self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


PQStats = Dict[int, PQStat]  # category_id -> PQStat


def merge_pq_stats(*stats: Mapping[int, PQStat]) -> PQStats:
    """The category-wise sum of several `PQStats` (e.g. a running total and one image's)."""
    total: PQStats = {}
    for one in stats:
        for category_id, stat in one.items():
            total[category_id] = total[category_id] + stat if category_id in total else stat
    return total


def _as_category_dict(categories: Categories) -> Dict[int, Mapping[str, Any]]:
    if isinstance(categories, Mapping):
        return dict(categories)
    return {c["id"]: c for c in categories}


def _segment_index(segments: Iterable[Mapping[str, Any]], image_id: Any, kind: str) -> Dict[int, Mapping]:
    """Segments by id (the last one wins on repeated ids, as panopticapi's dict does)."""
    by_id = {int(s["id"]): s for s in segments}
    if VOID in by_id:
        raise ValueError(f"image {image_id}: {kind} segment id {VOID} is reserved for VOID")
    return by_id


def pq_stats_from_arrays(gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
                         pred_ids: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
                         categories: Categories, *, image_id: Any = None,
                         gt_areas_from_json: bool = False) -> PQStats:
    """PQ sums of one image from in-memory id maps.

    Args:
      gt_ids, pred_ids: integer segment ids [H, W] (0 = VOID), e.g. from `rgb_to_id`.
      gt_segments: `segments_info` of the ground truth: dicts with id, category_id, iscrowd and,
        when `gt_areas_from_json`, area.
      pred_segments: `segments_info` of the prediction: dicts with id and category_id.
      categories: the ground truth's categories (list of dicts or {id: dict}).
      image_id: only used to name the image in error messages.
      gt_areas_from_json: take ground-truth areas from the segments' 'area' as panopticapi does
        (`pq_compute` does), instead of counting pixels of `gt_ids` (right for resized maps).
    Returns:
      {category_id: PQStat} for the categories seen in the image.
    Raises:
      KeyError when a predicted id is in the map but not in `pred_segments` or the reverse, or a
      predicted category is unknown; ValueError on mismatched shapes, ids outside [0, 2**24) or
      a segment with the VOID id 0 (which panopticapi would silently misread).
    """
    gt_ids, pred_ids = np.asarray(gt_ids), np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"image {image_id}: ground-truth id map {gt_ids.shape} and predicted "
                         f"{pred_ids.shape} differ in shape")
    for name, ids in (("ground-truth", gt_ids), ("predicted", pred_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
            raise ValueError(f"image {image_id}: {name} ids must lie in [0, 2**24)")
    categories = _as_category_dict(categories)
    gt_segms = _segment_index(gt_segments, image_id, "ground-truth")
    pred_segms = _segment_index(pred_segments, image_id, "predicted")

    # Every (gt id, pred id) pair present, with its pixel count: one sort, no pixel loop.
    keys, counts = np.unique(gt_ids.astype(np.int64).ravel() * OFFSET + pred_ids.astype(np.int64).ravel(),
                             return_counts=True)
    pair_gt, pair_pred = (keys // OFFSET).tolist(), (keys % OFFSET).tolist()

    present = set(pair_pred) - {VOID}
    if present - pred_segms.keys():
        raise KeyError(f"In the image with ID {image_id} segment IDs {sorted(present - pred_segms.keys())} "
                       f"are present in the PNG and not in the JSON segments_info.")
    if pred_segms.keys() - present:
        raise KeyError(f"In the image with ID {image_id} segment IDs {sorted(pred_segms.keys() - present)} "
                       f"are present in the JSON segments_info and not in the PNG.")
    for label, segment in pred_segms.items():
        if segment["category_id"] not in categories:
            raise KeyError(f"In the image with ID {image_id} segment with ID {label} has unknown "
                           f"category_id {segment['category_id']}.")

    # Confusion matrix: rows gt segments then VOID then unlisted gt ids; columns pred segments
    # then VOID.
    gt_list, pred_list = list(gt_segms), list(pred_segms)
    g_row = {g: i for i, g in enumerate(gt_list)}
    p_col = {p: j for j, p in enumerate(pred_list)}
    n_gt, n_pred = len(gt_list), len(pred_list)
    rows = [g_row.get(g, n_gt if g == VOID else n_gt + 1) for g in pair_gt]
    cols = [p_col.get(p, n_pred) for p in pair_pred]
    confusion = np.zeros((n_gt + 2, n_pred + 1), np.int64)
    np.add.at(confusion, (rows, cols), counts)

    inter = confusion[:n_gt, :n_pred]
    pred_area = confusion[:, :n_pred].sum(0)
    pred_void = confusion[n_gt, :n_pred]
    if gt_areas_from_json:
        gt_area = np.array([gt_segms[g]["area"] for g in gt_list], np.int64)
    else:
        gt_area = confusion[:n_gt].sum(1)
    gt_cat = np.array([gt_segms[g]["category_id"] for g in gt_list], np.int64)
    gt_crowd = np.array([gt_segms[g].get("iscrowd", 0) == 1 for g in gt_list], bool)
    pred_cat = np.array([pred_segms[p]["category_id"] for p in pred_list], np.int64)

    union = pred_area[None, :] + gt_area[:, None] - inter - pred_void[None, :]
    candidate = (inter > 0) & ~gt_crowd[:, None] & (gt_cat[:, None] == pred_cat[None, :])
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=candidate)
    matched = candidate & (iou > MATCH_IOU)

    iou_sum: Dict[int, float] = {}
    tp: Dict[int, int] = {}
    fp: Dict[int, int] = {}
    fn: Dict[int, int] = {}
    for i, j in zip(*np.nonzero(matched)):
        c = int(gt_cat[i])
        iou_sum[c] = iou_sum.get(c, 0.0) + float(iou[i, j])
        tp[c] = tp.get(c, 0) + 1

    crowd_row: Dict[int, int] = {}  # category -> its last crowd segment's row
    gt_matched = matched.any(1)
    for i in range(n_gt):
        if gt_crowd[i]:
            crowd_row[int(gt_cat[i])] = i
        elif not gt_matched[i]:
            fn[int(gt_cat[i])] = fn.get(int(gt_cat[i]), 0) + 1

    pred_matched = matched.any(0)
    for j in range(n_pred):
        if pred_matched[j]:
            continue
        c = int(pred_cat[j])
        ignored = pred_void[j] + (confusion[crowd_row[c], j] if c in crowd_row else 0)
        if ignored / pred_area[j] > IGNORED_FRACTION:
            continue
        fp[c] = fp.get(c, 0) + 1

    return {c: PQStat(iou_sum.get(c, 0.0), tp.get(c, 0), fp.get(c, 0), fn.get(c, 0))
            for c in sorted(set(tp) | set(fp) | set(fn))}


def pq_average(stats: Mapping[int, PQStat], categories: Categories) -> Dict[str, Any]:
    """panopticapi's result dict: 'All', 'Things', 'Stuff' ({'pq', 'sq', 'rq', 'n'}) and
    'per_class' ({category_id: {'pq', 'sq', 'rq'}}, zeros for categories never seen).

    Means run over the categories of `categories` with any TP, FP or FN ('n' of them); a split
    with none gives zeros (panopticapi divides by zero there)."""
    categories = _as_category_dict(categories)
    results: Dict[str, Any] = {}
    per_class: Dict[int, Dict[str, float]] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        sums, n = np.zeros(3), 0
        for category_id, category in categories.items():
            if isthing is not None and (category.get("isthing") == 1) != isthing:
                continue
            s = stats.get(category_id, PQStat())
            if s.tp + s.fp + s.fn == 0:
                per_class[category_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
            values = (s.iou / denominator, s.iou / s.tp if s.tp else 0.0, s.tp / denominator)
            per_class[category_id] = dict(zip(("pq", "sq", "rq"), values))
            sums += values
        mean = sums / n if n else sums
        results[name] = {"pq": float(mean[0]), "sq": float(mean[1]), "rq": float(mean[2]), "n": n}
    results["per_class"] = per_class
    return results


def _image_stats_from_files(annotations: Tuple[Mapping, Mapping], gt_folder: str, pred_folder: str,
                            categories: Mapping[int, Mapping[str, Any]]) -> PQStats:
    gt_ann, pred_ann = annotations
    gt_ids = read_id_map(os.path.join(gt_folder, gt_ann["file_name"]))
    pred_ids = read_id_map(os.path.join(pred_folder, pred_ann["file_name"]))
    return pq_stats_from_arrays(gt_ids, gt_ann["segments_info"], pred_ids, pred_ann["segments_info"],
                                categories, image_id=gt_ann["image_id"], gt_areas_from_json=True)


def _image_stats_or_failure(annotations: Tuple[Mapping, Mapping], strict: bool,
                            **kwargs) -> Tuple[Any, PQStats, str]:
    """(image id, its PQ sums, "") or (image id, {}, the reason it could not be scored); `strict`:
    the error is raised instead."""
    image_id = annotations[0]["image_id"]
    try:
        return image_id, _image_stats_from_files(annotations, **kwargs), ""
    except Exception as error:   # noqa: BLE001 (reported in failed_images; the other images go on)
        if strict:
            raise
        return image_id, {}, failure_reason(error)


def failure_reason(error: BaseException) -> str:
    """How a failed image's reason reads: the message, with the exception's kind when the message
    alone would not say it (a bare KeyError's message is just the key)."""
    text = str(error)
    if isinstance(error, OSError) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _warm_up_worker() -> None:
    # glibc serves big arrays with fresh mmaps (page faults on every image: ~1.5x the CPU time)
    # until it has freed one big block; free one up front, below its 32 MiB cap for that.
    np.empty(30 << 20, np.uint8)


def _worker_context() -> multiprocessing.context.BaseContext:
    # Not fork: the parent may hold JAX's threads.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def pq_compute(gt_json_file: Union[str, os.PathLike], pred_json_file: Union[str, os.PathLike],
               gt_folder: Union[str, os.PathLike, None] = None,
               pred_folder: Union[str, os.PathLike, None] = None, *,
               workers: int = 0, progress: bool = True, strict: bool = False) -> Dict[str, Any]:
    """panopticapi's `pq_compute` on COCO panoptic JSON files and PNG folders.

    Folders default to the JSON paths without '.json' (a missing folder is an error up front).
    `workers` > 0 reads and scores the images in that many processes; the result is the same as
    in-process (`workers=0`).  Extra predicted images are ignored.

    One image never costs the others: an image that cannot be scored (no prediction for it, a PNG
    missing or unreadable, id maps of two shapes, a segment id absent from `segments_info`, an
    unknown category, ...) is left out of the sums, with its reason in `failed_images`
    {str(image_id): reason}, and the others are scored.  `strict=True` raises on the first such
    image instead, as panopticapi does.  Returns `pq_average`'s dict plus `num_images` (scored)
    and `failed_images`.
    """
    gt_json_file, pred_json_file = os.fspath(gt_json_file), os.fspath(pred_json_file)
    with open(gt_json_file) as f:
        gt_json = json.load(f)
    with open(pred_json_file) as f:
        pred_json = json.load(f)
    gt_folder = os.fspath(gt_folder) if gt_folder is not None else gt_json_file.replace(".json", "")
    pred_folder = os.fspath(pred_folder) if pred_folder is not None else pred_json_file.replace(".json", "")
    for kind, folder in (("ground-truth", gt_folder), ("prediction", pred_folder)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder {folder} with {kind} segmentations doesn't exist")
    categories = {c["id"]: c for c in gt_json["categories"]}

    pred_by_image = {a["image_id"]: a for a in pred_json["annotations"]}
    pairs, failed = [], {}
    for gt_ann in gt_json["annotations"]:
        if gt_ann["image_id"] in pred_by_image:
            pairs.append((gt_ann, pred_by_image[gt_ann["image_id"]]))
            continue
        missing = KeyError(f"no prediction for the image with id: {gt_ann['image_id']}")
        if strict:
            raise missing
        failed[str(gt_ann["image_id"])] = missing.args[0]

    score = functools.partial(_image_stats_or_failure, strict=strict, gt_folder=gt_folder,
                              pred_folder=pred_folder, categories=categories)
    bar = functools.partial(tqdm, total=len(pairs), desc="PQ", unit="image", disable=not progress)
    total: PQStats = {}
    scored = 0
    with contextlib.ExitStack() as stack:
        outcomes = map(score, pairs)
        if workers > 0 and pairs:
            chunksize = max(1, min(16, len(pairs) // (4 * workers)))
            pool = stack.enter_context(_worker_context().Pool(workers, initializer=_warm_up_worker))
            outcomes = pool.imap(score, pairs, chunksize=chunksize)
        for image_id, stats, reason in bar(outcomes):
            if reason:
                failed[str(image_id)] = reason
                continue
            total, scored = merge_pq_stats(total, stats), scored + 1
    if failed:
        log.warning("PQ: %d of %d images could not be scored and are left out: %s", len(failed),
                    len(gt_json["annotations"]), "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:5]))
    return dict(pq_average(total, categories), num_images=scored, failed_images=failed)
