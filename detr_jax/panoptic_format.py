"""The COCO panoptic PNG codec: segment id <-> RGB colour, id = R + 256 G + 256^2 B.

Id 0 (`VOID`) is unlabeled; ids lie in [0, 2**24).  Post-processing writes PNGs with
`id_to_rgb`, the data readers and evaluation read them with `read_id_map`.  A `Predictor`'s
results number segments 0, 1, ... as the original's PostProcessPanoptic does; `coco_panoptic_ids`
shifts them by one into this format.

    ids = rgb_to_id(np.asarray(Image.open("000000000139.png")))   # int64 [H, W]
    rgb = id_to_rgb(ids)                                           # uint8 [H, W, 3]
"""
from __future__ import annotations

import os
from typing import Any, List, Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image

VOID = 0
ID_LIMIT = 256 ** 3   # ids are below 2**24


class PanopticPngError(ValueError):
    """A panoptic PNG that cannot be read as segment ids: missing, truncated or not RGB."""


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """Segment ids int64 [H, W] of a panoptic PNG's pixels uint8 [H, W, 3 or 4]."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"a panoptic PNG must be RGB; got an array of shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_id`: uint8 [H, W, 3] colours of segment ids [H, W] in [0, 2**24)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= ID_LIMIT):
        raise ValueError("panoptic segment ids must lie in [0, 2**24)")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def read_id_map(path: Union[str, os.PathLike]) -> np.ndarray:
    """Segment ids int64 [H, W] of a panoptic PNG file (RGB, RGBA, or a palette of RGB colours).

    Raises `PanopticPngError` naming the file when it is missing, truncated or not RGB (a grey
    PNG's values are not segment colours).
    """
    try:
        with Image.open(path) as image:
            if image.mode == "P":
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise PanopticPngError(f"cannot read the panoptic PNG {path}: {error}") from None
    try:
        return rgb_to_id(pixels)
    except ValueError as error:
        raise PanopticPngError(f"{path}: {error} (mode {image.mode})") from None


def coco_panoptic_ids(id_map: np.ndarray, segments_info: Sequence[Mapping[str, Any]]
                      ) -> Tuple[np.ndarray, List[Mapping[str, Any]]]:
    """(ids, segments) in the COCO panoptic convention (0 = VOID): a Predictor's 0-based segment ids
    shifted by one; a map without segments stays all VOID."""
    if not segments_info:
        return np.zeros_like(id_map, dtype=np.int32), []
    return (np.asarray(id_map) + 1).astype(np.int32), [dict(s, id=int(s["id"]) + 1) for s in segments_info]
