"""COCO evaluation: box and mask AP through pycocotools' COCOeval, PQ through `evaluation.pq`.

    results = evaluate(coco_gt="instances_val2017.json", box_results=boxes,
                       panoptic_gt_json="panoptic_val2017.json", panoptic_pred_json="pred.json")
    print(format_results(results))
    write_results_json(results, "eval.json")

Our post-processed predictions (boxes xyxy in original pixels, scores, labels, binary masks
[N, H, W]) become COCO result dicts with `boxes_to_coco_results` and `masks_to_coco_results`.
Labels are COCO category ids, as the original DETR's classes are; `category_ids` maps them
otherwise.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detr_jax.evaluation.pq import pq_compute
from detr_jax.panoptic_format import read_id_map

PathLike = Union[str, os.PathLike]
# The 12 numbers of COCOeval.stats for boxes and masks, in order.
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def _quiet(verbose: bool):
    """pycocotools prints progress on stdout; keep it only when asked."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def load_coco(gt: Union[PathLike, Mapping[str, Any], COCO], *, verbose: bool = False) -> COCO:
    """A pycocotools COCO from an instances JSON path, its loaded dict, or a COCO (returned as is)."""
    if isinstance(gt, COCO):
        return gt
    with _quiet(verbose):
        if isinstance(gt, Mapping):
            coco = COCO()
            coco.dataset = dict(gt)
            coco.createIndex()
            return coco
        return COCO(os.fspath(gt))


def coco_evaluate(coco_gt: Union[PathLike, Mapping[str, Any], COCO],
                  detections: Union[PathLike, Sequence[Mapping[str, Any]]], iou_type: str = "bbox", *,
                  image_ids: Optional[Sequence[int]] = None, verbose: bool = False) -> Dict[str, float]:
    """The 12 COCO numbers (`COCO_METRICS`, fractions in [0, 1]; -1 where COCOeval has no
    ground truth) of `detections` against `coco_gt`.

    Args:
      coco_gt: instances JSON path, its dict, or a pycocotools COCO.
      detections: COCO result dicts (image_id, category_id, score, and bbox [x, y, w, h] for
        "bbox" or RLE 'segmentation' for "segm"), or a path to a JSON list of them.
      iou_type: "bbox" or "segm".
      image_ids: evaluate only these images (default: all images of the ground truth).
      verbose: let pycocotools print its progress and summary.
    An empty list of detections gives zeros and a warning (pycocotools cannot load it).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if isinstance(detections, (str, os.PathLike)):
        with open(detections) as f:
            detections = json.load(f)
    if len(detections) == 0:
        warnings.warn(f"no detections to evaluate ({iou_type}): every COCO metric is reported as 0")
        return {name: 0.0 for name in COCO_METRICS}
    coco_gt = load_coco(coco_gt, verbose=verbose)
    with _quiet(verbose):
        # loadRes adds keys to the dicts it gets: give it copies.
        coco_dt = coco_gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_METRICS, evaluator.stats)}


def _category_of(labels: np.ndarray, category_ids: Optional[Sequence[int]]) -> List[int]:
    labels = np.asarray(labels).astype(np.int64).tolist()
    return labels if category_ids is None else [int(category_ids[label]) for label in labels]


def boxes_to_coco_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, *,
                          category_ids: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """COCO box results of one image from boxes [N, 4] (x0, y0, x1, y1 in original pixels),
    scores [N] and labels [N]."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    return [{"image_id": int(image_id), "category_id": c, "bbox": b, "score": float(s)}
            for b, s, c in zip(xywh, np.asarray(scores).tolist(), _category_of(labels, category_ids))]


def encode_masks(masks: np.ndarray) -> List[Dict[str, Any]]:
    """Compressed RLEs (counts as str, ready for JSON) of binary masks [N, H, W]."""
    masks = np.asarray(masks)
    if masks.shape[0] == 0:
        return []
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def masks_to_coco_results(image_id: int, masks: np.ndarray, scores: np.ndarray, labels: np.ndarray, *,
                          category_ids: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
    """COCO segmentation results of one image from binary masks [N, H, W] at the original image
    size, scores [N] and labels [N]. No 'bbox' key, as the original DETR (pycocotools then takes
    the detection's area from the mask)."""
    return [{"image_id": int(image_id), "category_id": c, "segmentation": rle, "score": float(s)}
            for rle, s, c in zip(encode_masks(masks), np.asarray(scores).tolist(),
                                 _category_of(labels, category_ids))]


def panoptic_to_instances(gt_json_file: PathLike, gt_folder: Optional[PathLike] = None) -> Dict[str, Any]:
    """A COCO instances dataset dict (things only, RLE masks from the PNGs) of a COCO panoptic
    ground truth, for box and mask AP on panoptic data. The folder defaults to the JSON path
    without '.json'."""
    gt_json_file = os.fspath(gt_json_file)
    with open(gt_json_file) as f:
        panoptic = json.load(f)
    gt_folder = os.fspath(gt_folder) if gt_folder is not None else gt_json_file.replace(".json", "")
    things = [c for c in panoptic["categories"] if c.get("isthing") == 1]
    thing_ids = {c["id"] for c in things}
    annotations = []
    for ann in panoptic["annotations"]:
        segments = [s for s in ann["segments_info"] if s["category_id"] in thing_ids]
        if not segments:
            continue
        ids = read_id_map(os.path.join(gt_folder, ann["file_name"]))
        rles = encode_masks(np.stack([ids == s["id"] for s in segments]))
        for segment, rle in zip(segments, rles):
            annotations.append({
                "id": len(annotations) + 1, "image_id": ann["image_id"],
                "category_id": segment["category_id"], "segmentation": rle,
                "area": segment.get("area", int(mask_util.area(rle))),
                "bbox": segment.get("bbox", mask_util.toBbox(rle).tolist()),
                "iscrowd": segment.get("iscrowd", 0)})
    return {"images": panoptic["images"], "categories": things, "annotations": annotations}


def evaluate(*, coco_gt: Union[PathLike, Mapping[str, Any], COCO, None] = None,
             box_results: Optional[Sequence[Mapping[str, Any]]] = None,
             mask_results: Optional[Sequence[Mapping[str, Any]]] = None,
             panoptic_gt_json: Optional[PathLike] = None, panoptic_pred_json: Optional[PathLike] = None,
             panoptic_gt_folder: Optional[PathLike] = None, panoptic_pred_folder: Optional[PathLike] = None,
             image_ids: Optional[Sequence[int]] = None, workers: int = 0,
             progress: bool = True) -> Dict[str, Any]:
    """Every metric whose inputs are given: {'bbox': coco numbers, 'segm': coco numbers,
    'panoptic': `pq_compute`'s dict}. `image_ids` restricts box and mask AP to those images."""
    results: Dict[str, Any] = {}
    for iou_type, detections in (("bbox", box_results), ("segm", mask_results)):
        if detections is not None:
            if coco_gt is None:
                raise ValueError(f"{iou_type} AP needs coco_gt, the ground-truth instances")
            coco_gt = load_coco(coco_gt)
            results[iou_type] = coco_evaluate(coco_gt, detections, iou_type, image_ids=image_ids)
    if (panoptic_gt_json is None) != (panoptic_pred_json is None):
        raise ValueError("PQ needs both panoptic_gt_json and panoptic_pred_json")
    if panoptic_gt_json is not None:
        results["panoptic"] = pq_compute(panoptic_gt_json, panoptic_pred_json, panoptic_gt_folder,
                                         panoptic_pred_folder, workers=workers, progress=progress)
    return results


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def format_results(results: Mapping[str, Any]) -> str:
    """Markdown tables in the papers' layout (numbers in %) of `evaluate`'s results: box and mask
    AP, AP50, AP75, APs, APm, APl; then PQ, SQ, RQ for all, things and stuff, with mask AP."""
    tables = []
    detection_rows = [(name, results[key]) for name, key in (("box", "bbox"), ("segm", "segm")) if key in results]
    if detection_rows:
        header = ("", "AP", "AP50", "AP75", "APs", "APm", "APl")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, stats in detection_rows:
            lines.append("| " + " | ".join([name] + [_percent(stats[k]) for k in header[1:]]) + " |")
        tables.append("\n".join(lines))
    if "panoptic" in results:
        pq = results["panoptic"]
        header = ["PQ", "SQ", "RQ", "PQth", "SQth", "RQth", "PQst", "SQst", "RQst"]
        values = [_percent(pq[split][k]) for split in ("All", "Things", "Stuff") for k in ("pq", "sq", "rq")]
        if "segm" in results:
            header.append("AP")
            values.append(_percent(results["segm"]["AP"]))
        counts = f"categories: {pq['All']['n']} ({pq['Things']['n']} things, {pq['Stuff']['n']} stuff)"
        tables.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                                 "| " + " | ".join(values) + " |", "", counts]))
    return "\n\n".join(tables)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_results_json(results: Mapping[str, Any], path: PathLike) -> None:
    """All numbers of `evaluate`'s results to a JSON file (fractions, not %; per-class keys become
    strings, as JSON keys must)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
