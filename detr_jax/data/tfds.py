"""COCO from TensorFlow Datasets: `coco/2017` and `coco/2017_panoptic` as `coco.py` records.

    from detr_jax.data.tfds import load_tfds
    train_set = load_tfds("coco/2017_panoptic", "train")        # TfdsCocoPanoptic
    val_set = load_tfds("coco/2017", "validation", training=False)  # TfdsCocoDetection, crowd kept

The records are exactly `detr_jax.data.coco`'s (see its docstring): image uint8 [H, W, 3],
image_id, orig_size, boxes xyxy absolute clipped, labels (COCO category ids, or contiguous with
`contiguous_labels`), iscrowd, area; panoptic adds masks, segment_ids and isthing.  The datasets
are read by index through `builder.as_data_source(split)` (random access, what the `Loader`
needs), so the dataset must be prepared in the array_record format
(`tfds build coco/2017 --file_format=array_record`); slices such as `validation[:500]` work.
Optional extra: `pip install "detr-jax[tfds]"`.

TFDS's coco builder (tensorflow_datasets/object_detection/coco.py, version 1.1.0):
- `objects` (coco/2017) / `panoptic_objects` (coco/2017_panoptic): per object `id`, `area`
  (int64), `is_crowd`, `bbox` (BBoxFeature: float32 [ymin, xmin, ymax, xmax] normalized by the
  image's height and width) and `label` (ClassLabel: the index of the category in the annotation
  file's id-sorted list, 0..79 over the 80 thing categories, 0..132 over the 133 panoptic ones).
  Labels are mapped back to COCO category ids with `detr_jax.labels` (by name when the builder
  knows the names, else by position).
- `panoptic_image`: the panoptic PNG (segment id = R + 256 G + 65536 B), `id` of the segments.
- coco/2017 has no instance masks: detection records never have `masks`, and mask AP (and the
  mask losses) need coco/2017_panoptic.

Where the data does not hold together (as `tfds.testing.mock_data`'s random examples do not),
the adapter copes instead of raising: per-object fields of unequal length are cut to the
shortest; a panoptic PNG whose size differs from its image is resized to the image's size with
nearest neighbour (ids are kept exactly); segments with the VOID id 0, repeated ids or empty
masks, and degenerate boxes are dropped.  Each is logged once and counted in `stats`.  A record
that cannot be read raises `BadSampleError` (the loader skips it).  TFDS decodes the images
itself (its `Image` feature: uint8 RGB, the stored pixels its annotations refer to), so the
decoder of `data/image.py` has no part here.

For evaluation (`detr_jax.evaluation.runner`), the datasets are their own ground truth
(`ground_truth()`): image infos, images, the panoptic id maps (at the image's size; pixels of
dropped segments are VOID) and segments, and a COCO instances dict (panoptic: the thing segments
as RLE), in data-source order (`--max-images N` evaluates the first N records).
"""
from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detr_jax.data.coco import OBJECT_FIELDS, BadSampleError, CocoBase, masks_to_boxes
from detr_jax.panoptic_format import rgb_to_id
from detr_jax.labels import panoptic_categories

log = logging.getLogger(__name__)

INSTALL_HINT = 'reading TensorFlow Datasets needs the tfds extra: pip install "detr-jax[tfds]"'
# COCO folder split names -> TFDS split names (any other name, e.g. "validation[:100]", is TFDS's).
SPLIT_NAMES = {"train2017": "train", "val2017": "validation", "test2017": "test"}
EVAL_CACHE = 32   # decoded records kept for evaluation, which reads each record a few times in a row


def require_tfds():
    """The `tensorflow_datasets` module, or an ImportError that says how to install it."""
    try:
        import tensorflow_datasets
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return tensorflow_datasets


def tfds_split(split: str) -> str:
    """A TFDS split name: COCO folder names (train2017, val2017) are translated."""
    return SPLIT_NAMES.get(split, split)


def resize_nearest(array: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, C] -> [H, W, C] with nearest neighbour (PIL), values unchanged."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((size[1], size[0]), Image.NEAREST))


class _TfdsCoco(CocoBase):
    """Shared: the builder and data source, label mapping, object fields, the evaluation view."""

    OBJECTS = "objects"
    THINGS_ONLY = True

    def __init__(self, name: str, split: str, *, data_dir: Optional[str], drop_crowd: bool,
                 contiguous_labels: bool):
        tfds = require_tfds()
        builder = tfds.builder(name, data_dir=data_dir)
        if self.OBJECTS not in builder.info.features:
            other = "TfdsCocoPanoptic" if "panoptic_objects" in builder.info.features else "TfdsCocoDetection"
            raise ValueError(f"{name} has no {self.OBJECTS!r} feature: use {other} (or load_tfds)")
        categories = [c for c in panoptic_categories() if c["isthing"] or not self.THINGS_ONLY]
        super().__init__(categories, contiguous_labels)
        self.name, self.split, self.drop_crowd = name, tfds_split(split), drop_crowd
        self.tfds_label_to_category_id = _tfds_label_map(builder.info.features[self.OBJECTS]["label"],
                                                         self.categories, name)
        try:
            self.source = builder.as_data_source(split=self.split)
        except NotImplementedError as error:   # prepared as tfrecord: no random access
            raise RuntimeError(f"{name} is not prepared in a random-access format; detr-jax reads records by "
                               f"index: prepare it with `tfds build {name} --file_format=array_record` "
                               f"(or `tfds convert_format`)\n{error}") from error
        self._warned: set = set()
        self._eval_lock = threading.Lock()
        self._meta: Dict[int, Dict[str, Any]] = {}       # record index -> info and annotations (evaluation)
        self._index_of_id: Dict[int, int] = {}
        self._cached_example = functools.lru_cache(maxsize=EVAL_CACHE)(self._example)
        log.info("%s[%s]: %d records", name, self.split, len(self))

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.split!r}, {len(self)} records)"

    # ------------------------------------------------------------------------------------------
    # Reading

    def _example(self, index: int) -> Dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range [0, {len(self)})")
        try:
            example = self.source[index]
            image = np.asarray(example["image"])
        except Exception as error:  # corrupt record or undecodable image: the loader skips it
            raise BadSampleError(f"{self.name}[{self.split}] record {index}: {error}") from error
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise BadSampleError(f"{self.name}[{self.split}] record {index}: image {image.dtype} {image.shape}")
        return example

    def _flag(self, key: str, count: int = 1, message: Optional[str] = None, *args) -> None:
        """Count `key` in `stats` and log `message` the first time (readers run in threads)."""
        if count <= 0:
            return
        with self._lock:
            self.stats[key] += count
            first = key not in self._warned
            self._warned.add(key)
        if first and message:
            log.warning(message + " (logged once; counts in .stats)", *args)

    def _objects(self, example: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """The per-object fields, cut to a common length; labels as COCO category ids."""
        objects = example[self.OBJECTS]
        fields = {"bbox": np.asarray(objects["bbox"], np.float32).reshape(-1, 4),
                  "label": np.asarray(objects["label"], np.int64).reshape(-1),
                  "is_crowd": np.asarray(objects["is_crowd"], bool).reshape(-1),
                  "area": np.asarray(objects["area"], np.float32).reshape(-1),
                  "id": np.asarray(objects["id"], np.int64).reshape(-1)}
        n = min(len(v) for v in fields.values())
        if any(len(v) != n for v in fields.values()):
            self._flag("objects with fields of unequal length (cut)", 1,
                       "%s: per-object fields of unequal lengths %s, cut to %d",
                       self.name, {k: len(v) for k, v in fields.items()}, n)
            fields = {k: v[:n] for k, v in fields.items()}
        known = (fields["label"] >= 0) & (fields["label"] < len(self.tfds_label_to_category_id))
        self._flag("objects of unknown label", int((~known).sum()), "%s: labels outside the ClassLabel", self.name)
        fields = {k: v[known] for k, v in fields.items()}
        fields["category_id"] = self.tfds_label_to_category_id[fields.pop("label")]
        return fields

    @staticmethod
    def _image_id(example: Dict[str, Any]) -> int:
        return int(np.asarray(example["image/id"]))

    @staticmethod
    def _file_name(example: Dict[str, Any]) -> str:
        name = example.get("image/filename", "")
        return name.decode() if isinstance(name, bytes) else str(name)

    # ------------------------------------------------------------------------------------------
    # Evaluation: the dataset is its own ground truth (see detr_jax.evaluation.runner)

    panoptic = False
    has_instance_masks = False

    def ground_truth(self) -> "_TfdsCoco":
        return self

    def image_info(self, index: int) -> Dict[str, Any]:
        """{'id', 'file_name', 'height', 'width'} of record `index`."""
        return self._eval_meta(index)["info"]

    def load_image(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] of record `index`; raises BadSampleError."""
        return np.asarray(self._cached_example(index)["image"])

    def index_of(self, image_id: int) -> int:
        """The record of an image id (records read so far, else a scan of the whole split)."""
        if int(image_id) not in self._index_of_id:
            for index in range(len(self)):
                if index not in self._meta:
                    try:
                        self._eval_meta(index)
                    except BadSampleError:
                        continue
                if int(image_id) in self._index_of_id:
                    break
            else:
                raise KeyError(f"image id {image_id} is not in {self.name}[{self.split}]")
        return self._index_of_id[int(image_id)]

    def instances_gt(self, indices: Sequence[int]) -> Dict[str, Any]:
        """A COCO instances dict (images, annotations, categories) of these records."""
        images, annotations = [], []
        for index in indices:
            meta = self._eval_meta(index)
            images.append(meta["info"])
            for ann in meta["instances"]:
                annotations.append(dict(ann, id=len(annotations) + 1))
        categories = [c for c in self.categories if c.get("isthing", 1)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _eval_meta(self, index: int) -> Dict[str, Any]:
        with self._eval_lock:
            if index in self._meta:
                return self._meta[index]
        example = self._cached_example(index)
        h, w = np.asarray(example["image"]).shape[:2]
        info = {"id": self._image_id(example), "file_name": self._file_name(example), "height": int(h),
                "width": int(w)}
        meta = {"info": info, **self._annotations(example, index, (h, w))}
        with self._eval_lock:
            other = self._index_of_id.setdefault(info["id"], index)
            if other != index:
                raise ValueError(f"{self.name}[{self.split}]: image id {info['id']} is in records {other} and "
                                 f"{index}; evaluation needs unique image ids")
            self._meta[index] = meta
        return meta


class TfdsCocoDetection(_TfdsCoco):
    """TFDS `coco/2017` (or `coco/2014`): boxes, labels, crowd flags; no masks.

    drop_crowd: drop is_crowd objects (the original does for training; keep them to evaluate).
    """

    def __init__(self, name: str = "coco/2017", split: str = "train", *, data_dir: Optional[str] = None,
                 drop_crowd: bool = True, contiguous_labels: bool = False):
        super().__init__(name, split, data_dir=data_dir, drop_crowd=drop_crowd,
                         contiguous_labels=contiguous_labels)

    def _boxes(self, objects: Dict[str, np.ndarray], h: int, w: int) -> np.ndarray:
        """Normalized [ymin, xmin, ymax, xmax] -> float32 xyxy pixels clipped to the image."""
        ymin, xmin, ymax, xmax = objects["bbox"].T
        boxes = np.stack([xmin * w, ymin * h, xmax * w, ymax * h], 1).astype(np.float32).reshape(-1, 4)
        return np.clip(boxes, 0, np.array([w, h, w, h], np.float32))

    def _record(self, example: Dict[str, Any], index: int, drop_crowd: bool) -> Dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        h, w = image.shape[:2]
        objects = self._objects(example)
        boxes = self._boxes(objects, h, w)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        self._flag("degenerate boxes", int((~keep).sum()))
        if drop_crowd:
            keep &= ~objects["is_crowd"]
        record = {"image": image, "image_id": self._image_id(example), "orig_size": np.array([h, w], np.int32),
                  "boxes": boxes, "labels": self._labels(objects["category_id"].tolist()),
                  "iscrowd": objects["is_crowd"], "area": objects["area"]}
        return {k: (v[keep] if k in OBJECT_FIELDS else v) for k, v in record.items()}

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        return self._record(self._example(index), index, self.drop_crowd)

    def _annotations(self, example, index: int, size: Tuple[int, int]) -> Dict[str, Any]:
        record = self._record(example, index, drop_crowd=False)   # crowd kept: COCOeval ignores it
        category_ids = self.label_to_category_id[record["labels"]]
        instances = [{"image_id": record["image_id"], "category_id": int(c), "bbox": [x0, y0, x1 - x0, y1 - y0],
                      "area": float(a), "iscrowd": int(crowd)}
                     for (x0, y0, x1, y1), c, a, crowd in zip(record["boxes"].tolist(), category_ids,
                                                              record["area"], record["iscrowd"])]
        return {"instances": instances}


class TfdsCocoPanoptic(_TfdsCoco):
    """TFDS `coco/2017_panoptic`: one mask per segment (things and stuff) from the panoptic PNG.

    Boxes come from the masks (`masks_to_boxes`), as `CocoPanoptic`'s.  drop_crowd defaults to
    False (the original keeps crowd segments in the panoptic targets).  A PNG whose size differs
    from the image's is resized to it with nearest neighbour (logged once).
    """

    OBJECTS = "panoptic_objects"
    THINGS_ONLY = False
    panoptic = True
    has_instance_masks = True

    def __init__(self, name: str = "coco/2017_panoptic", split: str = "train", *, data_dir: Optional[str] = None,
                 drop_crowd: bool = False, contiguous_labels: bool = False):
        super().__init__(name, split, data_dir=data_dir, drop_crowd=drop_crowd,
                         contiguous_labels=contiguous_labels)
        self.isthing = {c["id"]: bool(c["isthing"]) for c in self.categories}

    def _id_map(self, example: Dict[str, Any], size: Tuple[int, int]) -> np.ndarray:
        """Segment ids int64 [H, W] at the image's size."""
        rgb = np.asarray(example["panoptic_image"])
        if rgb.shape[:2] != tuple(size):
            self._flag("panoptic PNGs resized to their image", 1,
                       "%s: panoptic PNG %s differs from its image %s: resized with nearest neighbour",
                       self.name, rgb.shape[:2], tuple(size))
            rgb = resize_nearest(rgb, size)
        return rgb_to_id(rgb)

    def _segments(self, example: Dict[str, Any], ids: np.ndarray):
        """(objects, masks bool [N, H, W]) of the segments present in the id map."""
        objects = self._objects(example)
        seg_ids = objects["id"]
        first = np.zeros(len(seg_ids), bool)
        first[np.unique(seg_ids, return_index=True)[1]] = True
        valid = first & (seg_ids != 0)
        self._flag("segments with the VOID id 0 or a repeated id", int((~valid).sum()),
                   "%s: segments with the VOID id 0 or a repeated id dropped", self.name)
        masks = ids[None] == seg_ids[:, None, None]
        nonempty = masks.any(axis=(1, 2))
        self._flag("empty segments", int((valid & ~nonempty).sum()),
                   "%s: segments absent from their panoptic PNG dropped", self.name)
        keep = valid & nonempty
        return {k: v[keep] for k, v in objects.items()}, masks[keep]

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        example = self._example(index)
        image = np.asarray(example["image"])
        h, w = image.shape[:2]
        objects, masks = self._segments(example, self._id_map(example, (h, w)))
        if self.drop_crowd:
            keep = ~objects["is_crowd"]
            objects, masks = {k: v[keep] for k, v in objects.items()}, masks[keep]
        category_ids = objects["category_id"].tolist()
        return {"image": image, "image_id": self._image_id(example), "orig_size": np.array([h, w], np.int32),
                "boxes": masks_to_boxes(masks), "masks": masks, "segment_ids": objects["id"],
                "labels": self._labels(category_ids), "iscrowd": objects["is_crowd"], "area": objects["area"],
                "isthing": np.array([self.isthing[c] for c in category_ids], bool).reshape(-1)}

    # Evaluation
    def panoptic_gt(self, index: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        """(segment ids int64 [H, W] at the image's size, segments_info) of record `index`."""
        example = self._cached_example(index)
        ids = self._id_map(example, np.asarray(example["image"]).shape[:2])
        segments = self._eval_meta(index)["segments"]
        known = np.isin(ids, [s["id"] for s in segments])
        return np.where(known, ids, 0), segments   # ids of dropped segments are VOID

    def _annotations(self, example, index: int, size: Tuple[int, int]) -> Dict[str, Any]:
        from pycocotools import mask as mask_utils

        objects, masks = self._segments(example, self._id_map(example, size))
        image_id = self._image_id(example)
        segments, instances = [], []
        for k, (segment_id, category_id, crowd) in enumerate(zip(objects["id"].tolist(),
                                                                 objects["category_id"].tolist(),
                                                                 objects["is_crowd"].tolist())):
            area = int(masks[k].sum())
            segments.append({"id": segment_id, "category_id": category_id, "iscrowd": int(crowd), "area": area})
            if self.isthing[category_id]:
                rle = mask_utils.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                instances.append({"image_id": image_id, "category_id": category_id, "segmentation": rle,
                                  "area": area, "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": int(crowd)})
        return {"segments": segments, "instances": instances}


def _tfds_label_map(feature, categories: List[Dict], name: str) -> np.ndarray:
    """TFDS label index -> COCO category id: by name when the ClassLabel has real names (a
    prepared dataset), else by position in the id-sorted category list (as TFDS builds it)."""
    ids = np.array([c["id"] for c in categories], np.int64)
    if feature.num_classes != len(categories):
        raise ValueError(f"{name}: {feature.num_classes} labels, expected {len(categories)} COCO categories")
    names = list(feature.names)
    if all(n == str(i) for i, n in enumerate(names)):   # no names (e.g. mock data): TFDS's order
        return ids
    by_name = {c["name"]: c["id"] for c in categories}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        log.warning("%s: label names %s are not COCO's; labels mapped by position", name, unknown[:5])
        return ids
    return np.array([by_name[n] for n in names], np.int64)


def load_tfds(name: str, split: str = "train", *, data_dir: Optional[str] = None, training: bool = True,
              contiguous_labels: bool = False):
    """`TfdsCocoPanoptic` for a builder with panoptic annotations, else `TfdsCocoDetection`.

    training: the training defaults (detection drops crowd objects); False keeps everything, for
    evaluation.
    """
    tfds = require_tfds()
    features = tfds.builder(name, data_dir=data_dir).info.features
    if "panoptic_objects" in features:
        return TfdsCocoPanoptic(name, split, data_dir=data_dir, contiguous_labels=contiguous_labels)
    return TfdsCocoDetection(name, split, data_dir=data_dir, drop_crowd=training, contiguous_labels=contiguous_labels)
