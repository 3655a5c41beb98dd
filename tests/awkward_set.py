"""A small COCO-format set of every awkward kind of image, written with PIL, for the reader,
evaluation and training tests.

`write_awkward_set(root)` writes `root/images/` (one file per kind in `KINDS`, except the
missing one), `root/instances.json` and `root/panoptic.json` with the PNGs in `root/panoptic/`.
Every image has one thing (category 1) whose box and panoptic segment lie in the annotated
frame, and a stuff segment (category 2) on the rest.  `EXPECTED[kind]` is the pixels a reader
must return (None: the image must be skipped).
"""
from __future__ import annotations

import json
import pathlib
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from detr_jax.panoptic_format import id_to_rgb

H, W = 12, 16
BASE = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY = BASE[..., 0]
EXIF_ORIENTATION = 0x0112


def _exif_jpeg(path: pathlib.Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation   # 6: rotate 90 degrees clockwise to display
    Image.fromarray(BASE).save(path, format="JPEG", quality=95, exif=exif.tobytes())


def _stored_jpeg_pixels(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _image(kind: str):
    """(PIL image or None, file suffix, annotated (h, w)) of a kind written by PIL directly."""
    grey16 = GREY.astype(np.uint16) * 257                        # 16-bit: exactly GREY after scaling
    palette = Image.fromarray(BASE).quantize(8)
    palette_alpha = palette.copy()
    palette_alpha.info["transparency"] = 0
    tiny = BASE[:2, :3]
    elongated = np.tile(BASE[:3], (1, 6, 1))                    # 3 x 96
    return {
        "rgb": (Image.fromarray(BASE), "png", (H, W)),
        "grey": (Image.fromarray(GREY), "png", (H, W)),
        "grey16": (Image.fromarray(grey16), "png", (H, W)),
        "bilevel": (Image.fromarray(GREY > 127), "png", (H, W)),
        "palette": (palette, "png", (H, W)),
        "palette_alpha": (palette_alpha, "png", (H, W)),
        "grey_alpha": (Image.fromarray(GREY).convert("LA"), "png", (H, W)),
        "rgba": (Image.fromarray(np.concatenate([BASE, np.full((H, W, 1), 9, np.uint8)], -1)), "png", (H, W)),
        "cmyk": (Image.fromarray(BASE).convert("CMYK"), "tiff", (H, W)),
        "float": (Image.fromarray(GREY.astype(np.float32) / 255), "tiff", (H, W)),
        "tiny": (Image.fromarray(tiny), "png", tiny.shape[:2]),
        "elongated": (Image.fromarray(elongated), "png", elongated.shape[:2]),
    }[kind]


# kind -> annotated (h, w) for the kinds written by hand (EXIF, damaged, missing)
SPECIAL: Dict[str, Tuple[int, int]] = {
    "exif_upright": (W, H),       # annotated in the displayed frame (phone photos in annotation tools)
    "exif_stored": (H, W),        # annotated in the stored frame (COCO's own files)
    "exif_neither": (10, 10),     # neither: skipped, both sizes named
    "wrong_size": (H + 1, W),     # no EXIF, the json's size is not the file's: skipped
    "truncated": (H, W),
    "missing": (H, W),
}
PLAIN = ("rgb", "grey", "grey16", "bilevel", "palette", "palette_alpha", "grey_alpha", "rgba", "cmyk",
         "float", "tiny", "elongated")
KINDS = PLAIN + tuple(SPECIAL)
UNREADABLE = ("exif_neither", "wrong_size", "truncated", "missing")


def expected_pixels(kind: str, path: pathlib.Path) -> Optional[np.ndarray]:
    """The uint8 [h, w, 3] a dataset reader returns for this kind, worked out without the decoder."""
    grey3 = np.repeat(GREY[..., None], 3, -1)
    if kind in ("rgb", "rgba"):
        return BASE
    if kind in ("grey", "grey16", "float", "grey_alpha"):
        return grey3
    if kind == "bilevel":
        return np.repeat(np.where(GREY > 127, 255, 0).astype(np.uint8)[..., None], 3, -1)
    if kind in ("palette", "palette_alpha", "cmyk"):
        return np.asarray(_image(kind)[0].convert("RGB"))
    if kind in ("tiny", "elongated"):
        return np.asarray(_image(kind)[0])
    if kind == "exif_upright":
        return np.rot90(_stored_jpeg_pixels(path), k=-1)        # orientation 6: 90 degrees clockwise
    if kind == "exif_stored":
        return _stored_jpeg_pixels(path)
    return None


def write_awkward_set(root: pathlib.Path) -> Dict[str, object]:
    """Writes the set; returns {'images': dir, 'instances': json, 'panoptic': json, 'pngs': dir,
    'ids': {kind: image_id}, 'paths': {kind: image path}, 'sizes': {kind: annotated (h, w)}}."""
    root = pathlib.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "panoptic").mkdir(exist_ok=True)
    images, annotations, panoptic, ids, paths, sizes = [], [], [], {}, {}, {}
    for image_id, kind in enumerate(KINDS, start=1):
        if kind in PLAIN:
            picture, suffix, size = _image(kind)
        else:
            picture, suffix, size = None, "jpg" if kind.startswith("exif") else "png", SPECIAL[kind]
        path = root / "images" / f"{kind}.{suffix}"
        if picture is not None:
            picture.save(path)
        elif kind.startswith("exif"):
            _exif_jpeg(path, 6)
        elif kind == "wrong_size":
            Image.fromarray(BASE).save(path)
        elif kind == "truncated":
            Image.fromarray(BASE).save(path)
            path.write_bytes(path.read_bytes()[:60])
        h, w = size
        ids[kind], paths[kind], sizes[kind] = image_id, path, (h, w)
        images.append({"id": image_id, "file_name": path.name, "height": h, "width": w})
        # the thing: the bottom-right quarter of the annotated frame (outside the stored frame
        # of the EXIF-upright image, whose boxes a reader of raw pixels would clip away)
        x0, y0 = w // 2, h // 2
        box = [x0, y0, w - x0, h - y0]
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": box,
                            "area": float(box[2] * box[3]), "iscrowd": 0,
                            "segmentation": [[x0, y0, w, y0, w, h, x0, h]]})
        id_map = np.full((h, w), 2, np.int64)
        id_map[y0:, x0:] = 1
        Image.fromarray(id_to_rgb(id_map)).save(root / "panoptic" / f"{kind}.png")
        panoptic.append({"image_id": image_id, "file_name": f"{kind}.png", "segments_info": [
            {"id": 1, "category_id": 1, "iscrowd": 0, "area": int((id_map == 1).sum()), "bbox": box},
            {"id": 2, "category_id": 2, "iscrowd": 0, "area": int((id_map == 2).sum()), "bbox": [0, 0, w, h]}]})
    categories = [{"id": 1, "name": "thing", "supercategory": "x", "isthing": 1},
                  {"id": 2, "name": "stuff", "supercategory": "x", "isthing": 0}]
    (root / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories[:1]}))
    (root / "panoptic.json").write_text(json.dumps(
        {"images": images, "annotations": panoptic, "categories": categories}))
    return {"images": root / "images", "instances": root / "instances.json", "panoptic": root / "panoptic.json",
            "pngs": root / "panoptic", "ids": ids, "paths": paths, "sizes": sizes}
