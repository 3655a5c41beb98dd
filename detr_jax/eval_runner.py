"""Evaluation of a model on a COCO or COCO-panoptic folder: box AP, mask AP (panoptic models), PQ.

    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.eval_runner import evaluate_model
    results = evaluate_model("checkpoints/detr_r50_dc5_panoptic", CocoPanoptic("coco", "val2017"))
    # {'bbox': {'AP': ...}, 'segm': {...}, 'panoptic': {'All': {'pq': ...}, ...}, 'num_images': ...}

As the original's `engine.evaluate`: every query is a detection (PostProcess: score = max softmax
over the real classes, boxes in original pixels), its mask from PostProcessSegm (threshold 0.5),
and the panoptic map from PostProcessPanoptic (threshold 0.85); all at the original image size.
Labels are COCO category ids (the dataset's ids are the model's label ids).  Box and mask AP are
pycocotools' against the instances ground truth (`instances_SPLIT.json` beside the panoptic one
when there is one, else the things of the panoptic ground truth); COCOeval only scores the
categories of that ground truth, so stuff predictions do not count there.  PQ is panopticapi's,
accumulated image by image in memory (`pq_stats_from_arrays`), no PNG written.

Predicted panoptic segments of categories that the ground truth lacks are treated as VOID.

`evaluate_model` runs the model through a `Predictor` and hands its results to
`evaluate_predictions`, which any other source of results (e.g. ground truth, in the tests) can use.
Images are read as stored (no EXIF rotation: COCO's annotations refer to the stored pixels).
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from detr_jax.config import DataConfig
from detr_jax.data.coco import BadSampleError, CocoDetection, CocoPanoptic, coco_paths, find_image, read_image
from detr_jax.evaluate import (boxes_to_coco_results, coco_evaluate, load_coco, masks_to_coco_results,
                               panoptic_to_instances)
from detr_jax.panoptic_quality import merge_pq_stats, pq_average, pq_stats_from_arrays, read_id_map
from detr_jax.predict import Predictor, coco_panoptic_ids

Dataset = Union[CocoDetection, CocoPanoptic]


def load_dataset(data: Optional[str] = None, split: str = "val2017", *, images: Optional[str] = None,
                 annotations: Optional[str] = None, panoptic_json: Optional[str] = None,
                 panoptic_dir: Optional[str] = None) -> Dataset:
    """A COCO-panoptic dataset when a panoptic ground truth is given or found under `data`, else
    COCO detection: `data` + `split` (the official layout) or the explicit paths."""
    if data is not None:
        paths = coco_paths(data, split)
        images = images or str(paths["images"])
        annotations = annotations or (str(paths["instances"]) if paths["instances"].exists() else None)
        if panoptic_json is None and paths["panoptic"].exists():
            panoptic_json, panoptic_dir = str(paths["panoptic"]), panoptic_dir or str(paths["panoptic_pngs"])
    if images is None:
        raise ValueError("give --data DIR (and --split), or --images DIR with --annotations / --panoptic-json")
    if panoptic_json is not None:
        dataset = CocoPanoptic(images_dir=images, ann_file=panoptic_json,
                               png_dir=panoptic_dir or os.path.splitext(panoptic_json)[0])
        dataset.instances_json = annotations
        return dataset
    if annotations is None:
        raise ValueError(f"no ground truth found: no instances or panoptic json for {data or images}")
    return CocoDetection(images_dir=images, ann_file=annotations, drop_crowd=False)


def _image_infos(dataset: Dataset) -> List[Dict[str, Any]]:
    return [item[0] for item in dataset.items]


def _instances_gt(dataset: Dataset):
    """The instances ground truth for box / mask AP: the dataset's `instances_json` when set (by
    `load_dataset`), else built from the dataset's own annotations (detection: as read, so build
    it with drop_crowd=False; panoptic: its thing segments, `panoptic_to_instances`)."""
    instances = getattr(dataset, "instances_json", None)
    if instances:
        return instances
    infos = _image_infos(dataset)
    if isinstance(dataset, CocoDetection):
        return {"images": infos, "annotations": [a for _, anns in dataset.items for a in anns],
                "categories": dataset.categories}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        gt = pathlib.Path(tmp) / "panoptic.json"
        gt.write_text(json.dumps({"images": infos, "categories": dataset.categories, "annotations": [
            {"image_id": info["id"], "file_name": png, "segments_info": segments}
            for info, png, segments in dataset.items]}))
        return panoptic_to_instances(gt, dataset.png_dir)


def _read_images(dataset: Dataset, infos: List[Dict[str, Any]], failures: Dict[int, str]) -> Iterator[np.ndarray]:
    for info in infos:
        try:
            yield read_image(find_image(dataset.images_dir, info["file_name"]))
        except BadSampleError as error:
            failures[info["id"]] = str(error)
            yield np.zeros((0, 0, 3), np.uint8)   # the Predictor reports it; the reason is kept here


def evaluate_model(model, dataset: Dataset, *, batch_size: int = 1, max_images: Optional[int] = None,
                   short_side: int = DataConfig.short_side, max_size: int = DataConfig.max_size,
                   bucket_multiple: Optional[int] = DataConfig.bucket_multiple, progress: bool = True,
                   **predictor_kwargs) -> Dict[str, Any]:
    """Box AP (and mask AP and PQ for panoptic models on panoptic data) of `model` on `dataset`.

    model: a checkpoint folder, a `DETRModel`, a (ModelConfig, variables) pair (e.g. from the train
    loop), or a ready `Predictor` (its settings are used as they are).
    dataset: `CocoDetection` or `CocoPanoptic` (`load_dataset`).  The first `max_images` images.
    Returns {'bbox': COCO numbers, 'segm': ..., 'panoptic': pq_average's dict, 'num_images',
    'failed_images': {image_id: reason}, 'seconds'}: see `evaluate_predictions`.
    """
    if isinstance(model, Predictor):
        predictor = model
    else:
        if isinstance(dataset, CocoPanoptic) and "is_thing_map" not in predictor_kwargs:
            isthing = dict(dataset.isthing)   # stuff merging follows the dataset's categories
            predictor_kwargs["is_thing_map"] = lambda c: isthing.get(int(c), True)
        predictor = Predictor(model, short_side=short_side, max_size=max_size, batch_size=batch_size,
                              threshold=0.0, bucket_multiple=bucket_multiple, **predictor_kwargs)
    predictor.return_masks = predictor.panoptic
    infos = _image_infos(dataset)[:max_images]
    failures: Dict[int, str] = {}
    start = time.perf_counter()

    def results() -> Iterator[Tuple[int, Dict[str, Any]]]:
        for result in predictor.predict_iter(_read_images(dataset, infos, failures), progress=progress):
            image_id = infos[result["index"]]["id"]
            if result["error"] and image_id not in failures:
                failures[image_id] = result["error"]
            yield image_id, result

    out = evaluate_predictions(results(), dataset, image_ids=[info["id"] for info in infos])
    out["failed_images"] = {str(k): v for k, v in failures.items()}
    out["seconds"] = time.perf_counter() - start
    return out


def evaluate_predictions(results: Iterable[Tuple[int, Mapping[str, Any]]], dataset: Dataset, *,
                         image_ids: Optional[List[int]] = None) -> Dict[str, Any]:
    """Metrics of (image_id, result) pairs in the `Predictor`'s format: `boxes` xyxy in original
    pixels, `scores`, `labels` (category ids); `masks` bool [N, H, W] for mask AP; `id_map` and
    `segments_info` (0-based ids, as the Predictor's) for PQ.  Failed results (`error` set) count
    as images without predictions.  `image_ids`: the images evaluated (default: those seen).
    """
    box_results: List[Dict[str, Any]] = []
    mask_results: List[Dict[str, Any]] = []
    pq_stats: Dict = {}
    panoptic = isinstance(dataset, CocoPanoptic)
    gt_segments = {info["id"]: (png, segments) for info, png, segments in dataset.items} if panoptic else {}
    seen, with_masks, with_panoptic = [], False, False
    for image_id, result in results:
        seen.append(int(image_id))
        failed = bool(result.get("error"))
        if not failed:
            box_results += boxes_to_coco_results(image_id, result["boxes"], result["scores"], result["labels"])
            if "masks" in result:
                with_masks = True
                mask_results += masks_to_coco_results(image_id, result["masks"], result["scores"],
                                                      result["labels"])
        if panoptic and (failed or "id_map" in result):
            png, segments = gt_segments[image_id]
            gt_ids = read_id_map(dataset.png_dir / png)
            if failed:  # no prediction: every ground-truth segment is missed
                pred_ids, pred_segments = np.zeros_like(gt_ids), []
            else:
                with_panoptic = True
                pred_ids, pred_segments = coco_panoptic_ids(result["id_map"], result["segments_info"])
                pred_ids, pred_segments = _known_categories(pred_ids, pred_segments, dataset.isthing)
            pq_stats = merge_pq_stats(pq_stats, pq_stats_from_arrays(
                gt_ids, segments, pred_ids, pred_segments, dataset.categories, image_id=image_id))
    image_ids = seen if image_ids is None else image_ids
    coco_gt = load_coco(_instances_gt(dataset))
    out: Dict[str, Any] = {"num_images": len(image_ids)}
    out["bbox"] = coco_evaluate(coco_gt, box_results, "bbox", image_ids=image_ids)
    if with_masks:
        out["segm"] = coco_evaluate(coco_gt, mask_results, "segm", image_ids=image_ids)
    if with_panoptic:
        out["panoptic"] = pq_average(pq_stats, dataset.categories)
    return out


def _known_categories(ids: np.ndarray, segments, known: Mapping[int, bool]):
    """Segments of categories the ground truth does not have become VOID (panopticapi would stop
    with a KeyError; a model's label space may be larger than the dataset's)."""
    unknown = [s["id"] for s in segments if s["category_id"] not in known]
    if not unknown:
        return ids, segments
    return np.where(np.isin(ids, unknown), 0, ids), [s for s in segments if s["category_id"] in known]


def default_output(checkpoint: Optional[str], split: str) -> pathlib.Path:
    """Where `detr-jax eval` writes its JSON by default: beside the checkpoint, else in the cwd."""
    name = f"eval_{split}.json"
    if checkpoint and pathlib.Path(checkpoint).is_dir():
        return pathlib.Path(checkpoint) / name
    return pathlib.Path.cwd() / name


def write_json(results: Mapping[str, Any], path) -> None:
    from detr_jax.evaluate import write_results_json

    write_results_json(results, path)
    json.loads(pathlib.Path(path).read_text())  # what was written is valid JSON
