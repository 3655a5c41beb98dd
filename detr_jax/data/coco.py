"""COCO detection and panoptic readers: one numpy record per image.

A record is a dict (the contract shared by transforms, the loader and any other source, e.g. a
future tensorflow-datasets adapter):

    image       uint8 [H, W, 3] RGB (HWC) in the frame the annotations refer to
                (`data/image.py`: the stored pixels when the json's height/width are the
                stored size, as COCO's own files and the original DETR; the EXIF-upright
                pixels when only those have the json's size; else the image is skipped)
    image_id    int
    orig_size   int32 [2] (h, w) of that frame
    boxes       float32 [N, 4] xyxy in absolute pixels, clipped to the image
    labels      int32 [N] category ids (or contiguous labels, see `contiguous_labels`)
    iscrowd     bool [N]
    area        float32 [N] (the annotation's area: mask pixels)
    masks       bool [N, H, W], True inside the object (panoptic, or detection with return_masks)
    segment_ids int64 [N], isthing bool [N] (panoptic only)

Boxes: detection boxes are the annotation's `bbox` (xywh -> xyxy); panoptic boxes are computed
from the masks like the original (`masks_to_boxes`: x_max is the index of the last pixel, so a
one-pixel-wide segment has width 0).

Bad data never raises mid-epoch from the loader: degenerate boxes and segments with empty masks
are dropped at construction (one summary warning); an unreadable image or PNG, or one whose
size is not the json's, makes `dataset[i]` raise `BadSampleError` (with the reason: for a size,
the sizes), which the loader catches, logs and counts and evaluation reports.
"""
from __future__ import annotations

import collections
import json
import logging
import pathlib
import threading
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from detr_jax.data.image import ImageLoadError, decode_image
from detr_jax.panoptic_format import PanopticPngError, read_id_map, rgb_to_id  # noqa: F401 (rgb_to_id: re-exported)

log = logging.getLogger(__name__)
PathLike = Union[str, pathlib.Path]

# Per-object fields of a record: transforms index and filter all of them together.
OBJECT_FIELDS = ("boxes", "labels", "iscrowd", "area", "masks", "segment_ids", "isthing")


class BadSampleError(Exception):
    """This item cannot be read (missing or corrupt file); the loader skips it."""


def read_image(path: PathLike, info: Dict) -> np.ndarray:
    """uint8 [H, W, 3] RGB of the image file of the json entry `info` (its height and width
    choose the frame, see `data/image.py`); raises BadSampleError with the reason."""
    try:
        return decode_image(path, annotated_size=(info["height"], info["width"]))
    except ImageLoadError as e:  # missing, truncated, not an image, neither frame of the json's size
        raise BadSampleError(str(e)) from e


def read_panoptic_png(path: PathLike, size) -> np.ndarray:
    """Segment ids int64 [H, W] of a panoptic PNG, which must have the (h, w) `size` of its
    image; raises BadSampleError with the reason."""
    try:
        ids = read_id_map(path)
    except PanopticPngError as e:
        raise BadSampleError(str(e)) from e
    if ids.shape != tuple(size):
        raise BadSampleError(f"panoptic PNG {path} is {ids.shape[0]}x{ids.shape[1]} (h x w), its image "
                             f"{int(size[0])}x{int(size[1])}")
    return ids


def find_image(folder: pathlib.Path, file_name: str) -> pathlib.Path:
    """`folder/file_name`, or a file with the same stem and another extension (e.g. .png vs .jpg)."""
    path = folder / file_name
    if path.exists():
        return path
    for other in sorted(folder.glob(pathlib.Path(file_name).stem + ".*")):
        return other
    return path


def coco_paths(root: PathLike, split: str) -> Dict[str, pathlib.Path]:
    """The official layout: images `root/split/`, json files and panoptic PNGs in `root/annotations/`."""
    root = pathlib.Path(root)
    png_dir = root / "annotations" / f"panoptic_{split}"
    if not png_dir.is_dir() and (root / f"panoptic_{split}").is_dir():
        png_dir = root / f"panoptic_{split}"  # the original DETR's --coco_panoptic_path layout
    return {"images": root / split, "instances": root / "annotations" / f"instances_{split}.json",
            "panoptic": root / "annotations" / f"panoptic_{split}.json", "panoptic_pngs": png_dir}


class CocoBase:
    """Shared: category tables, label mapping, the drop log, `__len__`."""

    def __init__(self, categories: List[Dict], contiguous_labels: bool):
        self.categories = sorted(categories, key=lambda c: c["id"])
        self.contiguous_labels = contiguous_labels
        ids = [c["id"] for c in self.categories]
        # label -> category id: identity on COCO ids, or the sorted ids for contiguous labels.
        self.label_to_category_id = np.array(ids if contiguous_labels else range(max(ids, default=0) + 1))
        self.category_id_to_label = {cid: (i if contiguous_labels else cid) for i, cid in enumerate(ids)}
        self.stats: collections.Counter = collections.Counter()  # what was dropped or flagged
        self._lock = threading.Lock()
        self.items: List = []

    @property
    def num_classes(self) -> int:
        """The smallest `ModelConfig.num_classes` that fits the labels (the original uses 91 / 250)."""
        return len(self.label_to_category_id)

    def __len__(self) -> int:
        return len(self.items)

    def _report(self, name: str) -> None:
        dropped = {k: v for k, v in self.stats.items() if v}
        if dropped:
            log.warning("%s: %d images; dropped or flagged while indexing: %s", name, len(self), dropped)

    def _labels(self, category_ids: Sequence[int]) -> np.ndarray:
        return np.array([self.category_id_to_label[c] for c in category_ids], np.int32).reshape(-1)


class CocoDetection(CocoBase):
    """COCO detection: `CocoDetection(root, "train2017")` or `CocoDetection(images_dir=, ann_file=)`.

    drop_crowd: drop iscrowd annotations from the targets (the original does; True for training).
    skip_empty: leave out images without annotations (the original keeps them: no-object targets).
    return_masks: also decode the instance masks (polygons or RLE) into `masks`.
    """

    def __init__(self, root: Optional[PathLike] = None, split: Optional[str] = None, *,
                 images_dir: Optional[PathLike] = None, ann_file: Optional[PathLike] = None,
                 drop_crowd: bool = True, contiguous_labels: bool = False, skip_empty: bool = False,
                 return_masks: bool = False):
        if root is not None:
            paths = coco_paths(root, split)
            images_dir, ann_file = images_dir or paths["images"], ann_file or paths["instances"]
        if images_dir is None or ann_file is None:
            raise ValueError("give a COCO root and split, or images_dir and ann_file")
        with open(ann_file) as f:
            data = json.load(f)
        super().__init__(data.get("categories", []), contiguous_labels)
        self.images_dir, self.return_masks = pathlib.Path(images_dir), return_masks
        anns_by_image = collections.defaultdict(list)
        for ann in data.get("annotations", []):
            anns_by_image[ann["image_id"]].append(ann)
        for info in sorted(data["images"], key=lambda im: im["id"]):
            anns = [a for a in anns_by_image.get(info["id"], []) if self._keep(a, info, drop_crowd)]
            if not anns:
                self.stats["images without objects" + (" (skipped)" if skip_empty else "")] += 1
                if skip_empty:
                    continue
            self.items.append((info, anns))
        self._report(f"CocoDetection({ann_file})")

    def _keep(self, ann: Dict, info: Dict, drop_crowd: bool) -> bool:
        if drop_crowd and ann.get("iscrowd", 0):
            return False
        if ann.get("category_id") not in self.category_id_to_label:
            self.stats["annotations of unknown category"] += 1
            return False
        x, y, w, h = ann["bbox"]
        x0, y0 = min(max(x, 0), info["width"]), min(max(y, 0), info["height"])
        x1, y1 = min(max(x + w, 0), info["width"]), min(max(y + h, 0), info["height"])
        if not (x1 > x0 and y1 > y0):
            self.stats["degenerate boxes"] += 1
            return False
        return True

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        info, anns = self.items[index]
        image = read_image(find_image(self.images_dir, info["file_name"]), info)
        h, w = image.shape[:2]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # clipping made it empty
        record = {"image": image, "image_id": int(info["id"]), "orig_size": np.array([h, w], np.int32),
                  "boxes": boxes, "labels": self._labels([a["category_id"] for a in anns]),
                  "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], bool).reshape(-1),
                  "area": np.array([a.get("area", 0) for a in anns], np.float32).reshape(-1)}
        if self.return_masks:
            masks = [_ann_mask(a, h, w) for a in anns]
            record["masks"] = np.stack(masks) if masks else np.zeros((0, h, w), bool)
        return {k: (v[keep] if k in OBJECT_FIELDS else v) for k, v in record.items()}


def _ann_mask(ann: Dict, h: int, w: int) -> np.ndarray:
    """bool [H, W] of a COCO segmentation (polygons, RLE or uncompressed RLE)."""
    from pycocotools import mask as mask_utils

    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w)) if segm else None
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    else:
        rle = segm
    return mask_utils.decode(rle).astype(bool) if rle is not None else np.zeros((h, w), bool)


class CocoPanoptic(CocoBase):
    """COCO panoptic: `CocoPanoptic(root, "val2017")` or `CocoPanoptic(images_dir=, ann_file=, png_dir=)`.

    One mask per segment (things and stuff).  drop_crowd defaults to False: the original keeps
    crowd segments in the panoptic targets.  Segments whose mask is empty are dropped.
    """

    def __init__(self, root: Optional[PathLike] = None, split: Optional[str] = None, *,
                 images_dir: Optional[PathLike] = None, ann_file: Optional[PathLike] = None,
                 png_dir: Optional[PathLike] = None, drop_crowd: bool = False,
                 contiguous_labels: bool = False, skip_empty: bool = False):
        if root is not None:
            paths = coco_paths(root, split)
            images_dir, ann_file = images_dir or paths["images"], ann_file or paths["panoptic"]
            png_dir = png_dir or paths["panoptic_pngs"]
        if images_dir is None or ann_file is None or png_dir is None:
            raise ValueError("give a COCO root and split, or images_dir, ann_file and png_dir")
        with open(ann_file) as f:
            data = json.load(f)
        super().__init__(data.get("categories", []), contiguous_labels)
        self.images_dir, self.png_dir = pathlib.Path(images_dir), pathlib.Path(png_dir)
        self.drop_crowd = drop_crowd
        self.isthing = {c["id"]: bool(c.get("isthing", 1)) for c in self.categories}
        anns = {a["image_id"]: a for a in data.get("annotations", [])}
        for info in sorted(data["images"], key=lambda im: im["id"]):
            ann = anns.get(info["id"])
            if ann is None:
                self.stats["images without a panoptic annotation (skipped)"] += 1
                continue
            segments = [s for s in ann["segments_info"] if s["category_id"] in self.category_id_to_label
                        and not (drop_crowd and s.get("iscrowd", 0))]
            self.stats["segments of unknown category"] += sum(
                s["category_id"] not in self.category_id_to_label for s in ann["segments_info"])
            if not segments:
                self.stats["images without objects" + (" (skipped)" if skip_empty else "")] += 1
                if skip_empty:
                    continue
            self.items.append((info, ann["file_name"], segments))
        self._report(f"CocoPanoptic({ann_file})")

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        info, png_name, segments = self.items[index]
        image = read_image(find_image(self.images_dir, info["file_name"]), info)
        h, w = image.shape[:2]
        ids = read_panoptic_png(self.png_dir / png_name, (h, w))
        seg_ids = np.array([s["id"] for s in segments], np.int64).reshape(-1)
        masks = ids[None] == seg_ids[:, None, None]
        nonempty = masks.any(axis=(1, 2))
        if not nonempty.all():
            log.warning("image %s: %d segments absent from %s dropped", info["id"], (~nonempty).sum(),
                        png_name)
            with self._lock:  # readers run in the loader's threads
                self.stats["empty segments"] += int((~nonempty).sum())
        record = {"image": image, "image_id": int(info["id"]), "orig_size": np.array([h, w], np.int32),
                  "boxes": masks_to_boxes(masks), "masks": masks, "segment_ids": seg_ids,
                  "labels": self._labels([s["category_id"] for s in segments]),
                  "iscrowd": np.array([bool(s.get("iscrowd", 0)) for s in segments], bool).reshape(-1),
                  "area": np.array([s.get("area", 0) for s in segments], np.float32).reshape(-1),
                  "isthing": np.array([self.isthing[s["category_id"]] for s in segments], bool).reshape(-1)}
        return {k: (v[nonempty] if k in OBJECT_FIELDS else v) for k, v in record.items()}


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """bool [N, H, W] -> float32 [N, 4] xyxy with x_max / y_max the last pixel's index (as the original).

    Empty masks give [0, 0, 0, 0].
    """
    n = masks.shape[0]
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        rows, cols = np.flatnonzero(masks[i].any(1)), np.flatnonzero(masks[i].any(0))
        if rows.size:
            boxes[i] = (cols[0], rows[0], cols[-1], rows[-1])
    return boxes
