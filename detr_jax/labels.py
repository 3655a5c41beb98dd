"""Category names and colours of the COCO label spaces that DETR models predict.

Two label spaces (`dataset` below):
- "coco": detection, ids 0..90 (the original DETR uses num_classes=91); the 80
  categories keep their COCO ids, the gaps (0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83) are "N/A";
- "coco_panoptic": 250 ids; the 133 COCO panoptic categories (things 1..90 with the same ids
  and names as detection, stuff 92..200), the rest "N/A".

Everything is read from `resources/panoptic_coco_categories.json` (the panopticapi list with
`id`, `name`, `supercategory`, `isthing`, `color`); the detection names are its thing names.
"""
from __future__ import annotations

import colorsys
import functools
import json
from importlib import resources
from typing import Dict, List, Tuple

NOT_AVAILABLE = "N/A"
NUM_DETECTION_IDS = 91   # ids 0..90
MAX_THING_ID = 90        # COCO thing ids are <= 90, stuff ids >= 92
DATASETS = ("coco", "coco_panoptic")


@functools.lru_cache(maxsize=None)
def _categories() -> Tuple[Dict, ...]:
    text = resources.files("detr_jax").joinpath("resources/panoptic_coco_categories.json").read_text()
    return tuple(json.loads(text))


def panoptic_categories() -> List[Dict]:
    """The 133 COCO panoptic categories: dicts with id, name, supercategory, isthing, color [r, g, b]."""
    return [dict(c, color=list(c["color"])) for c in _categories()]


@functools.lru_cache(maxsize=None)
def _by_id() -> Dict[int, Dict]:
    return {c["id"]: c for c in _categories()}


def coco_detection_names() -> List[str]:
    """The 91 COCO detection names, index = label id; "N/A" for unused ids (0 included)."""
    names = [NOT_AVAILABLE] * NUM_DETECTION_IDS
    for c in _categories():
        if c["isthing"]:
            names[c["id"]] = c["name"]
    return names


def label_name(label: int, dataset: str = "coco") -> str:
    """Name of a predicted label id in `dataset` ("coco" or "coco_panoptic"); "N/A" if unused."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {DATASETS}")
    category = _by_id().get(int(label))
    if category is None or (dataset == "coco" and not category["isthing"]):
        return NOT_AVAILABLE
    return category["name"]


def panoptic_is_thing(category_id: int) -> bool:
    """`isthing` of a COCO panoptic category; ids not listed count as things if <= 90."""
    category = _by_id().get(int(category_id))
    return bool(category["isthing"]) if category is not None else int(category_id) <= MAX_THING_ID


def category_color(category_id: int) -> Tuple[int, int, int]:
    """The official panoptic colour of a COCO category id (things and stuff), as (r, g, b) uint8.

    Ids without an official colour get a stable, saturated colour from the golden-ratio hue walk.
    """
    category = _by_id().get(int(category_id))
    if category is not None:
        return tuple(int(v) for v in category["color"])
    hue = (int(category_id) * 0.618033988749895) % 1.0
    return tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue, 0.75, 0.95))
