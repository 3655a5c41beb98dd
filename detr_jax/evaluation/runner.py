"""Evaluation of a model on a COCO or COCO-panoptic folder: box AP, mask AP (panoptic models), PQ.

    from detr_jax.data.coco import CocoPanoptic
    from detr_jax.evaluation.runner import evaluate_model
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
Images are read by the dataset's reader, in the frame their annotations refer to
(`detr_jax.data.image`: COCO's own files as stored, as the original reads them).

Datasets: `CocoDetection` / `CocoPanoptic` folders (`load_dataset`), or TensorFlow Datasets'
`coco/2017` / `coco/2017_panoptic` (`load_dataset(tfds="coco/2017_panoptic", split="validation")`,
`detr_jax.data.tfds`).  Evaluation sees either through `ground_truth(dataset)` (`GroundTruth`):
images in dataset order (COCO folders: by image id; TFDS: data-source order), the panoptic id
maps and segments, and the instances ground truth of the evaluated images.  coco/2017 has no
instance masks, so there is no mask AP on it.

`make_eval_fn` is the train loop's periodic evaluation (`detr-jax train --eval-every N`).
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from detr_jax.config import DataConfig
from detr_jax.data.coco import (BadSampleError, CocoDetection, CocoPanoptic, coco_paths, find_image, read_image,
                                read_panoptic_png)
from detr_jax.evaluation.coco import (boxes_to_coco_results, coco_evaluate, load_coco, masks_to_coco_results,
                                      panoptic_to_instances, write_results_json)
from detr_jax.evaluation.pq import failure_reason, merge_pq_stats, pq_average, pq_stats_from_arrays
from detr_jax.panoptic_format import coco_panoptic_ids
from detr_jax.predict import Predictor

Dataset = Union[CocoDetection, CocoPanoptic]


def load_dataset(data: Optional[str] = None, split: str = "val2017", *, images: Optional[str] = None,
                 annotations: Optional[str] = None, panoptic_json: Optional[str] = None,
                 panoptic_dir: Optional[str] = None, tfds: Optional[str] = None,
                 tfds_data_dir: Optional[str] = None):
    """A COCO-panoptic dataset when a panoptic ground truth is given or found under `data`, else
    COCO detection: `data` + `split` (the official layout) or the explicit paths; or the TFDS
    dataset `tfds` (e.g. "coco/2017_panoptic") and its `split` (val2017 means validation), crowd
    objects kept."""
    if tfds is not None:
        from detr_jax.data.tfds import load_tfds

        return load_tfds(tfds, split, data_dir=tfds_data_dir, training=False)
    if data is not None:
        paths = coco_paths(data, split)
        images = images or str(paths["images"])
        annotations = annotations or (str(paths["instances"]) if paths["instances"].exists() else None)
        if panoptic_json is None and paths["panoptic"].exists():
            panoptic_json, panoptic_dir = str(paths["panoptic"]), panoptic_dir or str(paths["panoptic_pngs"])
    if images is None:
        raise ValueError("give --data DIR (and --split), --images DIR with --annotations / --panoptic-json, "
                         "or --tfds NAME")
    if panoptic_json is not None:
        dataset = CocoPanoptic(images_dir=images, ann_file=panoptic_json,
                               png_dir=panoptic_dir or os.path.splitext(panoptic_json)[0])
        dataset.instances_json = annotations
        return dataset
    if annotations is None:
        raise ValueError(f"no ground truth found: no instances or panoptic json for {data or images}")
    return CocoDetection(images_dir=images, ann_file=annotations, drop_crowd=False)


# ------------------------------------------------------------------------------------------------
# The ground truth
# ------------------------------------------------------------------------------------------------
class GroundTruth(Protocol):
    """What evaluation reads from a dataset; records are addressed by index, in dataset order.

    categories: COCO category dicts (panoptic: with `isthing`).  panoptic: PQ can be computed
    (`isthing` {category_id: bool}, `panoptic_gt`).  has_instance_masks: mask AP can be computed.
    """

    categories: List[Dict[str, Any]]
    panoptic: bool
    has_instance_masks: bool

    def __len__(self) -> int: ...

    def image_info(self, index: int) -> Dict[str, Any]:
        """{'id', 'file_name', 'height', 'width'}."""

    def load_image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3]; raises BadSampleError."""

    def index_of(self, image_id: int) -> int: ...

    def panoptic_gt(self, index: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        """(segment ids int64 [H, W], segments_info: id, category_id, iscrowd, area)."""

    def instances_gt(self, indices: Sequence[int]) -> Union[str, Dict[str, Any]]:
        """The COCO instances ground truth (a dict or a json path) covering these images."""


class CocoFolderGroundTruth:
    """`GroundTruth` of a `CocoDetection` / `CocoPanoptic` read from files."""

    has_instance_masks = True   # detection: polygons / RLE; panoptic: the PNGs

    def __init__(self, dataset: Dataset):
        self.dataset, self.categories = dataset, dataset.categories
        self.panoptic = isinstance(dataset, CocoPanoptic)
        self.isthing = dataset.isthing if self.panoptic else None
        self._index = {item[0]["id"]: i for i, item in enumerate(dataset.items)}

    def __len__(self) -> int:
        return len(self.dataset.items)

    def image_info(self, index: int) -> Dict[str, Any]:
        return self.dataset.items[index][0]

    def load_image(self, index: int) -> np.ndarray:
        info = self.image_info(index)
        return read_image(find_image(self.dataset.images_dir, info["file_name"]), info)

    def index_of(self, image_id: int) -> int:
        return self._index[int(image_id)]

    def panoptic_gt(self, index: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        """Raises BadSampleError for a missing or unreadable PNG, or one whose size is not the image's."""
        info, png, segments = self.dataset.items[index]
        return read_panoptic_png(self.dataset.png_dir / png, (info["height"], info["width"])), segments

    def instances_gt(self, indices: Sequence[int]):
        """The dataset's `instances_json` when set (by `load_dataset`), else built from its own
        annotations (detection: as read, so build it with drop_crowd=False; panoptic: its thing
        segments, `panoptic_to_instances`)."""
        dataset = self.dataset
        instances = getattr(dataset, "instances_json", None)
        if instances:
            return instances
        items = [dataset.items[i] for i in indices]
        infos = [item[0] for item in items]
        if not self.panoptic:
            return {"images": infos, "annotations": [a for _, anns in items for a in anns],
                    "categories": dataset.categories}
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            gt = pathlib.Path(tmp) / "panoptic.json"
            gt.write_text(json.dumps({"images": infos, "categories": dataset.categories, "annotations": [
                {"image_id": info["id"], "file_name": png, "segments_info": segments}
                for info, png, segments in items]}))
            return panoptic_to_instances(gt, dataset.png_dir)


def ground_truth(dataset) -> GroundTruth:
    """The evaluation view of a dataset: its own `ground_truth()` (TFDS datasets), or a COCO folder's."""
    if hasattr(dataset, "ground_truth"):
        return dataset.ground_truth()
    if isinstance(dataset, (CocoDetection, CocoPanoptic)):
        return CocoFolderGroundTruth(dataset)
    raise TypeError(f"cannot evaluate on {type(dataset).__name__}: give a CocoDetection, CocoPanoptic or "
                    f"a dataset with ground_truth()")


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
def evaluate_model(model, dataset, *, batch_size: int = 1, max_images: Optional[int] = None,
                   short_side: int = DataConfig.short_side, max_size: int = DataConfig.max_size,
                   bucket_multiple: Optional[int] = DataConfig.bucket_multiple, progress: bool = True,
                   **predictor_kwargs) -> Dict[str, Any]:
    """Box AP (and mask AP and PQ for panoptic models on panoptic data) of `model` on `dataset`.

    model: a checkpoint folder, a `DETRModel`, a (ModelConfig, variables) pair (e.g. from the train
    loop), or a ready `Predictor` (its settings are used as they are, except `return_masks`, set
    for mask AP on a copy: the caller's Predictor is not changed).
    dataset: `CocoDetection` or `CocoPanoptic` (`load_dataset`), or a TFDS one
    (`detr_jax.data.tfds`).  The first `max_images` images (in the dataset's order).
    Returns {'bbox': COCO numbers, 'segm': ..., 'panoptic': pq_average's dict, 'num_images',
    'failed_images': {image_id: reason}, 'seconds'}: see `evaluate_predictions`.
    """
    gt = ground_truth(dataset)
    if isinstance(model, Predictor):
        predictor = model
    else:
        if gt.panoptic and "is_thing_map" not in predictor_kwargs:
            isthing = dict(gt.isthing)   # stuff merging follows the dataset's categories
            predictor_kwargs["is_thing_map"] = lambda c: isthing.get(int(c), True)
        predictor = Predictor(model, short_side=short_side, max_size=max_size, batch_size=batch_size,
                              threshold=0.0, bucket_multiple=bucket_multiple, **predictor_kwargs)
    return_masks = predictor.panoptic and gt.has_instance_masks
    if predictor.return_masks != return_masks:   # a Predictor of the caller's is left as it was
        predictor = predictor.with_options(return_masks=return_masks)
    count = len(gt) if max_images is None else min(len(gt), max_images)
    image_ids: List[Optional[int]] = []   # by index, filled as the images are read (None: unreadable record)
    read_failures: Dict[Any, str] = {}    # the reader's reasons, more precise than the Predictor's
    start = time.perf_counter()

    def images() -> Iterator[np.ndarray]:
        for index in range(count):
            try:
                image_ids.append(int(gt.image_info(index)["id"]))
                yield gt.load_image(index)
            except Exception as error:   # noqa: BLE001 (one record never costs the others)
                if len(image_ids) == index:   # not even the record's id could be read
                    image_ids.append(None)
                    read_failures[f"record {index}"] = _reason(error)
                else:
                    read_failures[image_ids[index]] = _reason(error)
                yield np.zeros((0, 0, 3), np.uint8)   # the Predictor reports it; the reason is kept here

    def results() -> Iterator[Tuple[int, Dict[str, Any]]]:
        for result in predictor.predict_iter(images(), progress=progress):
            image_id = image_ids[result["index"]]
            if image_id is not None:
                yield image_id, result

    out = evaluate_predictions(results(), dataset)   # the Predictor yields one result per image
    failed = dict(out["failed_images"], **{str(k): v for k, v in read_failures.items()})
    out["failed_images"] = failed
    out["seconds"] = time.perf_counter() - start
    return out


def evaluate_predictions(results: Iterable[Tuple[int, Mapping[str, Any]]], dataset, *,
                         image_ids: Optional[List[int]] = None) -> Dict[str, Any]:
    """Metrics of (image_id, result) pairs in the `Predictor`'s format: `boxes` xyxy in original
    pixels, `scores`, `labels` (category ids); `masks` bool [N, H, W] for mask AP; `id_map` and
    `segments_info` (0-based ids, as the Predictor's) for PQ.  `image_ids`: the images to evaluate
    (default: those seen).

    One image never costs the others: a failed result (`error` set), or any failure while scoring
    an image (its ground-truth PNG missing, unreadable or of another size than the prediction, a
    predicted segment id absent from `segments_info`, ...) leaves that image out of every metric
    and puts it in `failed_images` {str(image_id): reason}.  `num_images` counts the images
    evaluated; with none, no metric is computed.
    """
    gt = ground_truth(dataset)
    box_results: List[Dict[str, Any]] = []
    mask_results: List[Dict[str, Any]] = []
    pq_stats: Dict = {}
    evaluated: List[int] = []
    failed: Dict[str, str] = {}
    with_masks, with_panoptic = False, False
    for image_id, result in results:
        image_id = int(image_id)
        if result.get("error"):
            failed[str(image_id)] = str(result["error"])
            continue
        try:
            scored = _score_image(gt, image_id, result)
        except Exception as error:   # noqa: BLE001 (reported, and the evaluation goes on)
            failed[str(image_id)] = _reason(error)
            continue
        evaluated.append(image_id)
        box_results += scored["boxes"]
        if scored["masks"] is not None:
            with_masks, mask_results = True, mask_results + scored["masks"]
        if scored["pq"] is not None:
            with_panoptic, pq_stats = True, merge_pq_stats(pq_stats, scored["pq"])
    if image_ids is not None:
        evaluated = [int(i) for i in image_ids if str(int(i)) not in failed]
    out: Dict[str, Any] = {"num_images": len(evaluated), "failed_images": failed}
    if not evaluated:
        return out
    coco_gt = load_coco(gt.instances_gt([gt.index_of(i) for i in evaluated]))
    out["bbox"] = coco_evaluate(coco_gt, box_results, "bbox", image_ids=evaluated)
    if with_masks:
        out["segm"] = coco_evaluate(coco_gt, mask_results, "segm", image_ids=evaluated)
    if with_panoptic:
        out["panoptic"] = pq_average(pq_stats, gt.categories)
    return out


def _score_image(gt: "GroundTruth", image_id: int, result: Mapping[str, Any]) -> Dict[str, Any]:
    """One image's COCO box results, mask results (None without masks) and PQ sums (None without
    a panoptic prediction); raises on anything wrong with the image, its ground truth or result.
    On panoptic data the ground-truth PNG is read even for box-only results: the instances ground
    truth is built from it."""
    index = gt.index_of(image_id)
    scored: Dict[str, Any] = {"boxes": boxes_to_coco_results(image_id, result["boxes"], result["scores"],
                                                             result["labels"]), "masks": None, "pq": None}
    if "masks" in result and gt.has_instance_masks:
        scored["masks"] = masks_to_coco_results(image_id, result["masks"], result["scores"], result["labels"])
    if gt.panoptic:
        gt_ids, segments = gt.panoptic_gt(index)
        if "id_map" in result:
            pred_ids, pred_segments = coco_panoptic_ids(result["id_map"], result["segments_info"])
            pred_ids, pred_segments = _known_categories(pred_ids, pred_segments, gt.isthing)
            scored["pq"] = pq_stats_from_arrays(gt_ids, segments, pred_ids, pred_segments, gt.categories,
                                                image_id=image_id)
    return scored


def _reason(error: BaseException) -> str:
    """A failure's reason as reported (`pq.failure_reason`; a bad sample's message alone)."""
    if isinstance(error, BadSampleError) and str(error):
        return str(error)
    return failure_reason(error)


def _known_categories(ids: np.ndarray, segments, known: Mapping[int, bool]):
    """Segments of categories the ground truth does not have become VOID (panopticapi would stop
    with a KeyError; a model's label space may be larger than the dataset's)."""
    unknown = [s["id"] for s in segments if s["category_id"] not in known]
    if not unknown:
        return ids, segments
    return np.where(np.isin(ids, unknown), 0, ids), [s for s in segments if s["category_id"] in known]


def summary_metrics(results: Mapping[str, Any]) -> Dict[str, float]:
    """The headline numbers of `evaluate_model`'s results, flat: bbox_AP, bbox_AP50, segm_AP,
    segm_AP50, PQ, PQ_th, PQ_st (those computed), num_images, failed_images, seconds."""
    out = {"num_images": float(results["num_images"]), "failed_images": float(len(results.get("failed_images", {}))),
           "seconds": float(results.get("seconds", 0.0))}
    for kind in ("bbox", "segm"):
        if kind in results:
            out[f"{kind}_AP"], out[f"{kind}_AP50"] = results[kind]["AP"], results[kind]["AP50"]
    if "panoptic" in results:
        pq = results["panoptic"]
        out.update(PQ=pq["All"]["pq"], PQ_th=pq["Things"]["pq"], PQ_st=pq["Stuff"]["pq"])
    return out


def make_eval_fn(model_config, dataset, data_config: DataConfig = DataConfig(), *,
                 max_images: Optional[int] = None, batch_size: int = 1):
    """The train loop's periodic evaluation: `eval_fn(variables, step) -> summary_metrics(...)` of
    the model `model_config` with these variables on the first `max_images` of `dataset`, at the
    eval sizes of `data_config`.  One `DETRModel` is kept across calls (its jitted forward compiles
    once per shape); the variables are put on the device once per call."""
    import jax

    from detr_jax.runtime import DETRModel

    model: Optional[DETRModel] = None

    def eval_fn(variables: Dict[str, Any], step: int) -> Dict[str, float]:
        nonlocal model
        variables = jax.device_put(variables)
        if model is None:
            model = DETRModel(model_config, variables)
        model.variables = variables
        results = evaluate_model(model, dataset, batch_size=batch_size, max_images=max_images,
                                 short_side=data_config.short_side, max_size=data_config.max_size,
                                 bucket_multiple=data_config.bucket_multiple, progress=False)
        return summary_metrics(results)

    return eval_fn


def default_output(checkpoint: Optional[str], split: str) -> pathlib.Path:
    """Where `detr-jax eval` writes its JSON by default: beside the checkpoint, else in the cwd."""
    name = f"eval_{split}.json"
    if checkpoint and pathlib.Path(checkpoint).is_dir():
        return pathlib.Path(checkpoint) / name
    return pathlib.Path.cwd() / name


def write_json(results: Mapping[str, Any], path) -> None:
    write_results_json(results, path)
    json.loads(pathlib.Path(path).read_text())  # what was written is valid JSON
